package deploy_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"sort"
	"strings"
	"testing"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/yaml"
)

// imagesDir is the one kustomization a user edits to point every manifest at
// the images they built and pushed (deploy/README.md, "Images: build and
// push"): a Component that base, gateway and jobs include.
const imagesDir = "deploy/k8s/images"

// testRegistry stands for the user's registry in the simulated
// `kustomize edit set image`.
const testRegistry = "registry.test/team/"

// checkImages: the images named in deploy/ are placeholders that no registry
// serves, so every one must be rewritten by kustomize, and the one
// `kustomize edit set image` in imagesDir that deploy/README.md gives must
// reach them all. Three checks:
//   - every file under deploy/ that names a container image is included by
//     a kustomization (a file applied with kubectl apply -f is out of
//     kustomize's reach);
//   - every image it names is rewritten by some kustomization's images:
//     entry (kustomize matches the name exactly, without tag or digest);
//   - with imagesDir's entries pointed at testRegistry, every kustomization
//     that can be built renders only images from testRegistry.
func checkImages(ks *kedaSchemas, tr tree) []error {
	var errs []error
	var dirs []string
	for p := range tr {
		if strings.HasPrefix(p, "deploy/") && path.Base(p) == "kustomization.yaml" {
			dirs = append(dirs, path.Dir(p))
		}
	}
	sort.Strings(dirs)

	rewritten := map[string]bool{} // images: names
	included := map[string]bool{}  // files named by resources or patches
	for _, dir := range dirs {
		var k types.Kustomization
		if err := yaml.Unmarshal(tr[dir+"/kustomization.yaml"], &k); err != nil {
			errs = append(errs, fmt.Errorf("%s/kustomization.yaml: %w", dir, err))
			continue
		}
		for _, img := range k.Images {
			rewritten[img.Name] = true
		}
		refs := slices.Clone(k.Resources)
		for _, p := range k.Patches {
			refs = append(refs, p.Path)
		}
		for _, ref := range refs {
			if ref != "" {
				included[path.Clean(path.Join(dir, ref))] = true
			}
		}
	}
	if len(tr[imagesDir+"/kustomization.yaml"]) == 0 {
		errs = append(errs, fmt.Errorf("%s/kustomization.yaml is missing: it is where the images are set", imagesDir))
	}

	var files []string
	for p := range tr {
		if strings.HasPrefix(p, "deploy/") && !strings.HasPrefix(p, "deploy/monitoring/") &&
			(strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) && path.Base(p) != "kustomization.yaml" {
			files = append(files, p)
		}
	}
	sort.Strings(files)
	for _, f := range files {
		docs, err := yamlDocs(tr[f])
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
			continue
		}
		for _, doc := range docs {
			for _, img := range containerImages(doc) {
				if !included[f] {
					errs = append(errs, fmt.Errorf("%s names image %s, but no kustomization includes the file: kustomize edit set image cannot reach it", f, img))
				}
				if !rewritten[imageName(img)] {
					errs = append(errs, fmt.Errorf("%s names image %s, which no kustomization's images: entry rewrites (name %q)", f, img, imageName(img)))
				}
			}
		}
	}

	// What `kustomize edit set image NAME=registry.test/team/NAME:test` in
	// imagesDir writes, for every entry there.
	c := tr.clone()
	var k types.Kustomization
	if err := yaml.Unmarshal(c[imagesDir+"/kustomization.yaml"], &k); err == nil && len(k.Images) > 0 {
		for i, img := range k.Images {
			k.Images[i] = types.Image{Name: img.Name, NewName: testRegistry + path.Base(img.Name), NewTag: "test"}
		}
		b, err := yaml.Marshal(k)
		if err != nil {
			return append(errs, err)
		}
		c[imagesDir+"/kustomization.yaml"] = b
	} else {
		errs = append(errs, fmt.Errorf("%s/kustomization.yaml: no images: entries", imagesDir))
	}
	for _, dir := range dirs {
		if isComponent(c, dir) {
			continue
		}
		objs, rerrs := render(ks, c, dir)
		if len(rerrs) > 0 && len(objs) == 0 {
			errs = append(errs, rerrs...) // other checks report the objects' own problems
			continue
		}
		for _, o := range objs {
			var doc map[string]any
			if err := yaml.Unmarshal(o.json, &doc); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", o, err))
				continue
			}
			for _, img := range containerImages(doc) {
				if !strings.HasPrefix(img, testRegistry) {
					errs = append(errs, fmt.Errorf("%s: image %s stays after kustomize edit set image in %s (want %s...)", o, img, imagesDir, testRegistry))
				}
			}
		}
	}
	return errs
}

// yamlDocs decodes each document of a YAML stream into a generic map.
func yamlDocs(b []byte) ([]map[string]any, error) {
	var docs []map[string]any
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		if isBlankYAML(doc) {
			continue
		}
		var m map[string]any
		if err := yaml.Unmarshal(doc, &m); err != nil {
			return nil, err
		}
		docs = append(docs, m)
	}
}

// containerImages returns the image of every container, init container and
// ephemeral container anywhere in v, whatever the kind (Deployment, Job,
// KEDA ScaledJob, a patch).
func containerImages(v any) []string {
	var imgs []string
	switch v := v.(type) {
	case map[string]any:
		for key, child := range v {
			if key == "containers" || key == "initContainers" || key == "ephemeralContainers" {
				list, _ := child.([]any)
				for _, c := range list {
					if c, ok := c.(map[string]any); ok {
						if img, ok := c["image"].(string); ok {
							imgs = append(imgs, img)
						}
					}
				}
			}
			imgs = append(imgs, containerImages(child)...)
		}
	case []any:
		for _, child := range v {
			imgs = append(imgs, containerImages(child)...)
		}
	}
	sort.Strings(imgs)
	return imgs
}

// imageName is ref without its digest and tag: what kustomize matches an
// images: entry's name against.
func imageName(ref string) string {
	ref, _, _ = strings.Cut(ref, "@")
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		ref = ref[:i]
	}
	return ref
}

func TestEveryImageIsSetByKustomize(t *testing.T) {
	t.Parallel()
	ks, tr := setup(t)
	if errs := checkImages(ks, tr); len(errs) > 0 {
		t.Fatalf("%d problems:\n%v", len(errs), errors.Join(errs...))
	}
}

// TestImageChecksCatchBrokenCopies: each way an image can escape
// `kustomize edit set image` is refused, the model-pull Job as it was
// (applied with -f, its image written out) first.
func TestImageChecksCatchBrokenCopies(t *testing.T) {
	t.Parallel()
	ks, good := setup(t)
	const (
		job      = "deploy/k8s/jobs/model-pull.yaml"
		deployF  = "deploy/k8s/base/deployment.yaml"
		gateway  = "deploy/k8s/gateway/kustomization.yaml"
		hardcode = "image: ghcr.io/sous-run/sous-worker-ollama:0.1.0"
	)
	tests := []struct {
		name  string
		m     mutation
		unset string // a file removed from the tree
		want  string
	}{
		{"the job as it was: its own image, applied with -f", mutation{job, "image: sous-worker-ollama", hardcode}, "deploy/k8s/jobs/kustomization.yaml",
			"deploy/k8s/jobs/model-pull.yaml names image ghcr.io/sous-run/sous-worker-ollama:0.1.0, which no kustomization's images: entry rewrites"},
		{"a job outside every kustomization", mutation{job, "", ""}, "deploy/k8s/jobs/kustomization.yaml", "but no kustomization includes the file"},
		{"image written out in a kustomization", mutation{deployF, "image: sous-worker-ollama", hardcode}, "",
			"image ghcr.io/sous-run/sous-worker-ollama:0.1.0 stays after kustomize edit set image"},
		{"image the component does not know", mutation{deployF, "image: sous-worker-ollama", "image: sous-worker"}, "", `which no kustomization's images: entry rewrites (name "sous-worker")`},
		{"a sidecar from elsewhere", mutation{deployF, "      containers:\n", "      initContainers:\n        - name: init\n          image: busybox:1.36\n      containers:\n"}, "", "names image busybox:1.36"},
		{"component left out", mutation{gateway, "components:\n  # The image (sous-gateway) is set there, for every kustomization at once.\n  - ../images\n", ""}, "",
			"image sous-gateway stays after kustomize edit set image"},
		{"scaler component left out", mutation{"deploy/k8s/scaler/kustomization.yaml", "components:\n  # The image (sous-scaler) is set there, for every kustomization at once.\n  - ../images\n", ""}, "",
			"image sous-scaler stays after kustomize edit set image"},
		{"a tag on the placeholder is still rewritten", mutation{deployF, "image: sous-worker-ollama", "image: sous-worker-ollama:dev"}, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tr := tt.m.apply(t, good)
			if tt.unset != "" {
				delete(tr, tt.unset)
			}
			requireErr(t, checkImages(ks, tr), tt.want)
		})
	}
}
