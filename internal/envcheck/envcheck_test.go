package envcheck_test

import (
	"reflect"
	"slices"
	"testing"

	"github.com/sous-run/sous/internal/envcheck"
)

func TestCheck(t *testing.T) {
	t.Parallel()
	type nested struct {
		B string `env:"SOUS_NESTED_ONLY"`
	}
	type cfg struct {
		A string `env:"SOUS_ONLY_HERE,notEmpty"`
		N nested
	}
	known := envcheck.Tags(reflect.TypeFor[cfg]())
	if !slices.Equal(known, []string{"SOUS_ONLY_HERE", "SOUS_NESTED_ONLY"}) {
		t.Fatalf("Tags = %q", known)
	}
	tests := []struct {
		name    string
		environ []string
		want    []envcheck.Unknown
	}{
		{"misspelled", []string{"SOUS_ENGNE_URL=http://x"}, []envcheck.Unknown{{Name: "SOUS_ENGNE_URL", Closest: "SOUS_ENGINE_URL"}}},
		{"known here", []string{"SOUS_ONLY_HERE=1", "SOUS_NESTED_ONLY=2"}, nil},
		{"known to another binary", []string{"SOUS_GATEWAY_ADDR=:1", "SOUS_BATCH_MAX=3"}, nil},
		{"closest is the binary's own", []string{"SOUS_ONLY_HERR=1"}, []envcheck.Unknown{{Name: "SOUS_ONLY_HERR", Closest: "SOUS_ONLY_HERE"}}},
		{"not ours", []string{"HOME=/root", "OLLAMA_HOST=x", "SOUSX=1"}, nil},
		{"once each, sorted", []string{"SOUS_QEUE=a", "SOUS_BATCH_MAXX=1", "SOUS_QEUE=b"}, []envcheck.Unknown{
			{Name: "SOUS_BATCH_MAXX", Closest: "SOUS_BATCH_MAX"}, {Name: "SOUS_QEUE", Closest: "SOUS_QUEUE"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := envcheck.Check(tt.environ, known); !slices.Equal(got, tt.want) {
				t.Errorf("Check(%q) = %+v, want %+v", tt.environ, got, tt.want)
			}
		})
	}
}
