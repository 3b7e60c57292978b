package inference_test

import (
	"testing"

	"github.com/sous-run/sous/internal/inference"
)

func TestHasModel(t *testing.T) {
	t.Parallel()
	// What Ollama 0.6.5's /api/tags lists (Name.DisplayShortest: always a
	// tag, no default registry or namespace), and ids of other servers.
	have := []string{"tiny:latest", "tiny-endless:latest", "team/alias-b:v1", "localhost:5000/ns/model:latest", "Qwen/Qwen3-0.6B", "gpt-4o-mini"}
	tests := []struct {
		want string
		has  bool
	}{
		{"tiny:latest", true},
		{"tiny", true}, // the implicit tag
		{"library/tiny", true},
		{"registry.ollama.ai/library/tiny:latest", true},
		{"REGISTRY.ollama.ai/library/tiny", true},
		{"tiny:v2", false},
		{"Tiny", false}, // case matters
		{"tiny-endless", true},
		{"team/alias-b:v1", true},
		{"team/alias-b", false}, // that would be team/alias-b:latest
		{"registry.ollama.ai/team/alias-b:v1", true},
		{"localhost:5000/ns/model", true}, // a port is not a tag
		{"localhost:5000/ns/model:v1", false},
		{"Qwen/Qwen3-0.6B", true},
		{"Qwen/Qwen3-0.6B:latest", true},
		{"qwen/qwen3-0.6b", false},
		{"gpt-4o-mini", true},
		{"gpt-4o", false},
		{"", false},
	}
	for _, tt := range tests {
		if got := inference.HasModel(have, tt.want); got != tt.has {
			t.Errorf("HasModel(%q) = %v, want %v", tt.want, got, tt.has)
		}
	}
	if inference.HasModel(nil, "tiny") {
		t.Error("HasModel(nil, tiny) = true")
	}
	// A name listed without a tag (a server that lists bare names) still
	// matches the same name asked with Ollama's default tag.
	if !inference.HasModel([]string{"tiny"}, "tiny:latest") {
		t.Error("HasModel([tiny], tiny:latest) = false")
	}
}
