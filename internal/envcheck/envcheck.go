package envcheck

import (
	"reflect"
	"slices"
	"strings"
)

// Prefix is what marks a variable as sous's.
const Prefix = "SOUS_"

// Unknown is one variable that nothing reads.
type Unknown struct {
	Name    string // as set, such as SOUS_ENGNE_URL
	Closest string // the known name nearest to it, such as SOUS_ENGINE_URL
}

// Tags returns the variables named by the env tags of the struct type t,
// nested structs without a tag of their own included.
func Tags(t reflect.Type) []string {
	var out []string
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	for i := range t.NumField() {
		f := t.Field(i)
		if tag := f.Tag.Get("env"); tag != "" {
			out = append(out, strings.Split(tag, ",")[0])
		} else if f.Type.Kind() == reflect.Struct {
			out = append(out, Tags(f.Type)...)
		}
	}
	return out
}

// Check returns the SOUS_* variables of environ (as os.Environ gives it)
// that are neither in known nor in Names, sorted by name, each with the
// closest name of known and Names.
func Check(environ []string, known ...[]string) []Unknown {
	all := map[string]bool{}
	for _, n := range Names {
		all[n] = true
	}
	for _, k := range known {
		for _, n := range k {
			all[n] = true
		}
	}
	var out []Unknown
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, Prefix) || all[name] {
			continue
		}
		out = append(out, Unknown{Name: name, Closest: closest(name, all)})
	}
	slices.SortFunc(out, func(a, b Unknown) int { return strings.Compare(a.Name, b.Name) })
	return slices.CompactFunc(out, func(a, b Unknown) bool { return a.Name == b.Name })
}

// closest is the known SOUS_* name at the least edit distance from name;
// ties go to the first in sort order, so that the answer is stable.
func closest(name string, known map[string]bool) string {
	best, bestD := "", -1
	for k := range known {
		if !strings.HasPrefix(k, Prefix) {
			continue
		}
		d := distance(name, k)
		if bestD < 0 || d < bestD || (d == bestD && k < best) {
			best, bestD = k, d
		}
	}
	return best
}

// distance is the Levenshtein distance between a and b, in bytes (the
// names are ASCII).
func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
