package ollama

import (
	"context"

	"github.com/sous-run/sous/internal/inference"
)

// What the engine says about itself: optional abilities the worker finds
// with type assertions.

// TakesList reports whether ONE engine call can carry several requests of
// kind as a list: true for Embed (/api/embed takes a list input), false for
// Generate and Chat (/api/generate and /api/chat take one prompt or
// conversation per call; Ollama batches concurrent calls itself on its
// OLLAMA_NUM_PARALLEL slots). It does no I/O and is safe for concurrent
// use.
func (e *Engine) TakesList(kind inference.Kind) bool {
	return kind == inference.Embed
}

// Slots returns how many requests Ollama runs at once, where Ollama says
// it. It never can: Ollama 0.6.5 has no endpoint that shows
// OLLAMA_NUM_PARALLEL (/api/ps lists the loaded models with their size,
// VRAM and expiry; /api/show a model's metadata and parameters; /api/version
// the version), so Slots always returns 0, "", nil and the caller falls back
// to its configuration or an adaptive limit. n would be a count of
// requests; 0 means "cannot say", never "none".
func (e *Engine) Slots(ctx context.Context) (n int, source string, err error) {
	return 0, "", nil
}

// Models lists the models Ollama has (GET /api/tags), by the names Ollama
// shows: always with a tag, without the default registry and namespace
// ("tiny:latest", "team/model:v1"), most recently changed first. A model
// configured as "tiny" is "tiny:latest" here; inference.HasModel matches
// the two. Errors are classified like every other engine error.
func (e *Engine) Models(ctx context.Context) ([]string, error) {
	list, err := e.client.List(ctx)
	if err != nil {
		return nil, classify(err)
	}
	names := make([]string, 0, len(list.Models))
	for _, m := range list.Models {
		name := m.Name
		if name == "" {
			name = m.Model
		}
		if name != "" {
			names = append(names, name)
		}
	}
	return names, nil
}
