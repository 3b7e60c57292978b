package integration

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	neturl "net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/wire"
)

// TestEmbeddingsBatchedEndToEnd: embedding requests that share a model go
// to the real Ollama as ONE /api/embed call per batch, and each request
// gets back its own vectors.
func TestEmbeddingsBatchedEndToEnd(t *testing.T) {
	t.Parallel()
	target, _ := neturl.Parse(ollama.URL())
	proxy := httputil.NewSingleHostReverseProxy(target)
	var embedCalls atomic.Int32
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/api/embed" {
			embedCalls.Add(1)
		}
		// Full duplex: otherwise the server closes the request body when the
		// engine's answer starts, the proxy's transport, still finishing the
		// body it forwards, fails and cuts the answer short ("ReverseProxy
		// read error during body copy: use of closed network connection",
		// golang/go#40747), now and then, on a loaded machine.
		_ = http.NewResponseController(w).EnableFullDuplex()
		proxy.ServeHTTP(w, r)
	}))
	defer front.Close()
	q, results := names(t)
	startWorker(t, q, "SOUS_ENGINE_URL="+front.URL, "SOUS_BATCH_MAX=8", "SOUS_ENGINE_PARALLEL=8")
	c := newClient(t)
	const n = 6
	for i := range n {
		c.publish(q, fmt.Sprint("e", i), "", fmt.Sprintf(`{"input":["first %d","second %d"]}`, i, i))
	}
	got := c.collect(results, n, 60*time.Second)
	batches := map[string]bool{}
	for i := range n {
		r := decodeResult(t, got[fmt.Sprint("e", i)])
		if r.Status != wire.StatusOK || len(r.Embeddings) != 2 || len(r.Embeddings[0]) != 64 {
			t.Fatalf("e%d: %+v", i, r)
		}
		batches[r.Batch.ID] = true
	}
	// One call per list; a list Ollama refused for lack of room (busy
	// while it loads the model) is retried in the worker as a new call,
	// under the batch id of the call that answered.
	if calls := int(embedCalls.Load()); calls < len(batches) || calls > len(batches)+2 {
		t.Fatalf("%d /api/embed calls for %d batches: want one call per batch (and at most two retries)", calls, len(batches))
	}
	t.Logf("%d requests in %d batches", n, len(batches))
}
