package deploy_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"golang.org/x/text/message"
	"sigs.k8s.io/yaml"
)

// kedaSchemas is what an API server with KEDA installed, and KEDA itself,
// know about KEDA objects: the CRD schemas and every scaler's metadata keys.
type kedaSchemas struct {
	// crds holds the compiled openAPIV3Schema of each KEDA kind.
	crds map[string]*jsonschema.Schema
	// cel lists the CRD's x-kubernetes-validations rules by kind. CEL is not
	// evaluated here; celChecks implements the known rules by hand, and a rule
	// without an implementation fails the tests instead of being skipped.
	cel map[string][]string
	// scalers maps a trigger type to its parameters by name.
	scalers map[string]map[string]scalerParam
}

// scalerParam is one entry of scalers-schema.json.
type scalerParam struct {
	Name                                  string   `json:"name"`
	Type                                  string   `json:"type"`
	Optional                              bool     `json:"optional"`
	Default                               *string  `json:"default"`
	AllowedValue                          []string `json:"allowedValue"`
	Deprecated                            string   `json:"deprecated"`
	DeprecatedAnnounce                    string   `json:"deprecatedAnnounce"`
	Separator                             string   `json:"separator"`
	RangeSeparator                        string   `json:"rangeSeparator"`
	MetadataVariableReadable              bool     `json:"metadataVariableReadable"`
	EnvVariableReadable                   bool     `json:"envVariableReadable"`
	TriggerAuthenticationVariableReadable bool     `json:"triggerAuthenticationVariableReadable"`
}

// required reports whether KEDA refuses a trigger that does not give p.
func (p scalerParam) required() bool { return !p.Optional && p.Default == nil }

// celChecks are the hand translations of the CRDs' CEL rules, by kind and rule.
var celChecks = map[string]map[string]func(obj map[string]any) error{
	"ScaledObject": {
		"!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)": func(obj map[string]any) error {
			spec, _ := obj["spec"].(map[string]any)
			minR, hasMin := number(spec["minReplicaCount"])
			maxR, hasMax := number(spec["maxReplicaCount"])
			if !hasMax {
				maxR = 100
			}
			if hasMin && minR > maxR {
				return fmt.Errorf("spec: minReplicaCount must be less than or equal to maxReplicaCount (%v > %v)", minR, maxR)
			}
			return nil
		},
	},
}

func number(v any) (float64, bool) {
	switch n := v.(type) {
	case json.Number:
		f, err := n.Float64()
		return f, err == nil
	case float64:
		return n, true
	}
	return 0, false
}

var (
	kedaOnce sync.Once
	kedaSet  *kedaSchemas
	kedaErr  error
)

// loadKEDA compiles the schemas once per test binary; they are read-only after.
func loadKEDA(t *testing.T) *kedaSchemas {
	t.Helper()
	dir := schemaDir(t)
	kedaOnce.Do(func() { kedaSet, kedaErr = compileKEDA(dir) })
	if kedaErr != nil {
		t.Fatal(kedaErr)
	}
	return kedaSet
}

func compileKEDA(dir string) (*kedaSchemas, error) {
	ks := &kedaSchemas{
		crds:    map[string]*jsonschema.Schema{},
		cel:     map[string][]string{},
		scalers: map[string]map[string]scalerParam{},
	}
	crdFiles, err := filepath.Glob(filepath.Join(dir, "keda.sh_*.yaml"))
	if err != nil {
		return nil, err
	}
	if len(crdFiles) == 0 {
		return nil, fmt.Errorf("no KEDA CRDs in %s", dir)
	}
	c := jsonschema.NewCompiler()
	c.AssertVocabs()
	vocab, err := listTypeVocabulary()
	if err != nil {
		return nil, err
	}
	c.RegisterVocabulary(vocab)
	for _, f := range crdFiles {
		if err := ks.addCRD(c, f); err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Base(f), err)
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, "scalers-schema.json"))
	if err != nil {
		return nil, err
	}
	var doc struct {
		KedaVersion   string `json:"kedaVersion"`
		SchemaVersion int    `json:"schemaVersion"`
		Scalers       []struct {
			Type       string        `json:"type"`
			Parameters []scalerParam `json:"parameters"`
		} `json:"scalers"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields() // a new field in the schema file may change what a key means
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("scalers-schema.json: %w", err)
	}
	if doc.SchemaVersion != 1 {
		return nil, fmt.Errorf("scalers-schema.json: schemaVersion %d, the checks know version 1", doc.SchemaVersion)
	}
	for _, s := range doc.Scalers {
		params := map[string]scalerParam{}
		for _, p := range s.Parameters {
			params[p.Name] = p
		}
		ks.scalers[s.Type] = params
	}
	return ks, nil
}

// addCRD compiles the served, stored version of one CRD.
func (ks *kedaSchemas) addCRD(c *jsonschema.Compiler, file string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	j, err := yaml.YAMLToJSON(b)
	if err != nil {
		return err
	}
	var crd struct {
		Spec struct {
			Group string `json:"group"`
			Names struct {
				Kind string `json:"kind"`
			} `json:"names"`
			Versions []struct {
				Name    string `json:"name"`
				Served  bool   `json:"served"`
				Storage bool   `json:"storage"`
				Schema  struct {
					OpenAPIV3Schema json.RawMessage `json:"openAPIV3Schema"`
				} `json:"schema"`
			} `json:"versions"`
		} `json:"spec"`
	}
	if err := json.Unmarshal(j, &crd); err != nil {
		return err
	}
	kind := crd.Spec.Names.Kind
	for _, v := range crd.Spec.Versions {
		if !v.Served || v.Name != "v1alpha1" {
			continue
		}
		raw, err := jsonschema.UnmarshalJSON(bytes.NewReader(v.Schema.OpenAPIV3Schema))
		if err != nil {
			return err
		}
		root, ok := raw.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: openAPIV3Schema is not an object", kind)
		}
		ks.cel[kind] = append(ks.cel[kind], toJSONSchema(root)...)
		url := "mem://" + crd.Spec.Group + "/" + v.Name + "/" + kind
		if err := c.AddResource(url, root); err != nil {
			return err
		}
		sch, err := c.Compile(url)
		if err != nil {
			return err
		}
		ks.crds[kind] = sch
	}
	if ks.crds[kind] == nil {
		return fmt.Errorf("%s: no served v1alpha1 version", kind)
	}
	return nil
}

// toJSONSchema turns a Kubernetes structural schema into the JSON Schema the
// API server effectively enforces, in place, and returns its CEL rules:
//   - x-kubernetes-int-or-string: integer or string;
//   - objects with properties and no x-kubernetes-preserve-unknown-fields are
//     closed (additionalProperties: false), as kubectl's default strict field
//     validation refuses unknown fields instead of pruning them;
//   - x-kubernetes-list-type / list-map-keys are kept for listTypeVocabulary;
//   - x-kubernetes-map-type only steers server-side apply; nothing to check;
//   - x-kubernetes-validations (CEL) are removed and returned.
func toJSONSchema(s map[string]any) (cel []string) {
	if v, _ := s["x-kubernetes-int-or-string"].(bool); v {
		delete(s, "x-kubernetes-int-or-string")
		if _, ok := s["anyOf"]; !ok {
			s["anyOf"] = []any{map[string]any{"type": "integer"}, map[string]any{"type": "string"}}
		}
	}
	if rules, ok := s["x-kubernetes-validations"].([]any); ok {
		for _, r := range rules {
			if m, ok := r.(map[string]any); ok {
				rule, _ := m["rule"].(string)
				cel = append(cel, rule)
			}
		}
		delete(s, "x-kubernetes-validations")
	}
	preserve, _ := s["x-kubernetes-preserve-unknown-fields"].(bool)
	if _, ok := s["properties"]; ok && !preserve {
		if _, ok := s["additionalProperties"]; !ok {
			s["additionalProperties"] = false
		}
	}
	for _, k := range []string{"properties", "patternProperties"} {
		if props, ok := s[k].(map[string]any); ok {
			for _, p := range props {
				if m, ok := p.(map[string]any); ok {
					cel = append(cel, toJSONSchema(m)...)
				}
			}
		}
	}
	for _, k := range []string{"items", "additionalProperties", "not"} {
		if m, ok := s[k].(map[string]any); ok {
			cel = append(cel, toJSONSchema(m)...)
		}
	}
	for _, k := range []string{"anyOf", "allOf", "oneOf"} {
		if list, ok := s[k].([]any); ok {
			for _, p := range list {
				if m, ok := p.(map[string]any); ok {
					cel = append(cel, toJSONSchema(m)...)
				}
			}
		}
	}
	return cel
}

// listTypeVocabulary enforces x-kubernetes-list-type: "set" items are unique,
// "map" items are unique by their x-kubernetes-list-map-keys.
func listTypeVocabulary() (*jsonschema.Vocabulary, error) {
	const url = "mem://sous/x-kubernetes-list-type"
	meta, err := jsonschema.UnmarshalJSON(strings.NewReader(`{
		"properties": {
			"x-kubernetes-list-type": {"enum": ["atomic", "set", "map"]},
			"x-kubernetes-list-map-keys": {"type": "array", "items": {"type": "string"}}
		}
	}`))
	if err != nil {
		return nil, err
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource(url, meta); err != nil {
		return nil, err
	}
	sch, err := c.Compile(url)
	if err != nil {
		return nil, err
	}
	return &jsonschema.Vocabulary{
		URL:    url,
		Schema: sch,
		Compile: func(_ *jsonschema.CompilerContext, obj map[string]any) (jsonschema.SchemaExt, error) {
			typ, _ := obj["x-kubernetes-list-type"].(string)
			switch typ {
			case "set":
				return listType{}, nil
			case "map":
				var keys []string
				list, _ := obj["x-kubernetes-list-map-keys"].([]any)
				for _, k := range list {
					s, _ := k.(string)
					keys = append(keys, s)
				}
				if len(keys) == 0 {
					return nil, fmt.Errorf("x-kubernetes-list-type map without x-kubernetes-list-map-keys")
				}
				return listType{keys: keys}, nil
			}
			return nil, nil
		},
	}, nil
}

// listType checks one list: whole items (set) or key tuples (map) are unique.
type listType struct{ keys []string }

func (l listType) Validate(ctx *jsonschema.ValidatorContext, v any) {
	arr, ok := v.([]any)
	if !ok {
		return
	}
	seen := map[string]int{}
	for i, item := range arr {
		var id any = item
		if l.keys != nil {
			obj, ok := item.(map[string]any)
			if !ok {
				continue
			}
			tuple := make([]any, len(l.keys))
			for j, k := range l.keys {
				tuple[j] = obj[k]
			}
			id = tuple
		}
		b, err := json.Marshal(id)
		if err != nil {
			ctx.AddErr(err)
			return
		}
		if j, dup := seen[string(b)]; dup {
			ctx.AddError(&duplicateListItem{keys: l.keys, i: j, j: i})
			return
		}
		seen[string(b)] = i
	}
}

type duplicateListItem struct {
	keys []string
	i, j int
}

func (*duplicateListItem) KeywordPath() []string { return []string{"x-kubernetes-list-type"} }

func (d *duplicateListItem) LocalizedString(p *message.Printer) string {
	if d.keys == nil {
		return p.Sprintf("items at %d and %d are equal in a list of type set", d.i, d.j)
	}
	return p.Sprintf("items at %d and %d have the same %v in a list of type map", d.i, d.j, d.keys)
}

// validateKEDA checks one KEDA object (JSON) against its CRD schema and CEL rules.
func (ks *kedaSchemas) validateKEDA(kind string, j []byte) []error {
	sch, ok := ks.crds[kind]
	if !ok {
		return []error{fmt.Errorf("no CRD for keda.sh kind %s", kind)}
	}
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(j))
	if err != nil {
		return []error{err}
	}
	var errs []error
	if err := sch.Validate(inst); err != nil {
		errs = append(errs, fmt.Errorf("%s schema: %w", kind, err))
	}
	obj, _ := inst.(map[string]any)
	for _, rule := range ks.cel[kind] {
		check, ok := celChecks[kind][rule]
		if !ok {
			errs = append(errs, fmt.Errorf("%s: CRD CEL rule without a hand translation in celChecks: %s", kind, rule))
			continue
		}
		if err := check(obj); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// triggerAuthParams lists the parameters a TriggerAuthentication provides.
func triggerAuthParams(ta *triggerAuthentication) []string {
	var ps []string
	for _, r := range ta.Spec.SecretTargetRef {
		ps = append(ps, r.Parameter)
	}
	for _, r := range ta.Spec.ConfigMapTargetRef {
		ps = append(ps, r.Parameter)
	}
	for _, r := range ta.Spec.Env {
		ps = append(ps, r.Parameter)
	}
	sort.Strings(ps)
	return slices.Compact(ps)
}
