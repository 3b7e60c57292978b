package ollamatest_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/sous-run/sous/integration/ollamatest"
)

// Start a real Ollama with the tiny model, outside a test (TestMain, a dev
// tool). In a test, StartT does the same and stops it in t.Cleanup.
func ExampleStart() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv, err := ollamatest.Start(ctx, ollamatest.Options{NumParallel: 2})
	if err != nil {
		fmt.Println(err) // says to run `make ollama` when the binary is missing
		return
	}
	defer srv.Stop(ctx)

	c := &http.Client{Timeout: time.Minute}
	defer c.CloseIdleConnections()
	body := `{"model":"tiny-endless","prompt":"hi","stream":false,"options":{"num_predict":3}}`
	resp, err := c.Post(srv.URL()+"/api/generate", "application/json", strings.NewReader(body))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer resp.Body.Close()
	var out struct {
		DoneReason string `json:"done_reason"`
		EvalCount  int    `json:"eval_count"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(resp.StatusCode, out.DoneReason, out.EvalCount)
	// Output: 200 length 3
}
