package inference

import "strings"

// Ollama's defaults for the parts of a model name one may leave out
// (github.com/ollama/ollama types/model/name.go: defaultHost,
// defaultNamespace, defaultTag).
const (
	ollamaHost      = "registry.ollama.ai"
	ollamaNamespace = "library"
	ollamaTag       = "latest"
)

// HasModel reports whether want, a model name from the configuration or a
// request, is among have, the names an engine lists (an engine's Models).
//
// Names match when they are equal, or when they are equal once Ollama's
// defaults are filled in: a name without a tag means the tag "latest", and
// the default registry and namespace ("registry.ollama.ai/library/") may be
// left out. So a configured "tiny" matches the "tiny:latest" that Ollama's
// /api/tags and /v1/models list, and "library/tiny" matches it too, but
// "tiny" does not match "tiny:v2". Case matters: Ollama keeps a model under
// a case-sensitive path, and OpenAI-compatible servers compare ids exactly.
// The same rule is applied to every engine; for a server whose ids never
// carry an Ollama-style tag it reduces to equality.
func HasModel(have []string, want string) bool {
	if want == "" {
		return false
	}
	c := canonicalModel(want)
	for _, h := range have {
		if h == want || canonicalModel(h) == c {
			return true
		}
	}
	return false
}

// canonicalModel writes name the way Ollama's Name.DisplayShortest does:
// always with a tag, without the default registry and namespace.
func canonicalModel(name string) string {
	// A ':' before the last '/' is a registry port, not a tag.
	if strings.LastIndexByte(name, ':') <= strings.LastIndexByte(name, '/') {
		name += ":" + ollamaTag
	}
	parts := strings.Split(name, "/")
	if len(parts) == 3 && strings.EqualFold(parts[0], ollamaHost) {
		parts = parts[1:]
	}
	if len(parts) == 2 && parts[0] == ollamaNamespace {
		parts = parts[1:]
	}
	return strings.Join(parts, "/")
}
