package gateway

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/sous-run/sous/internal/wire"
)

// Item 13 of the hardening issue: what OpenAI refuses is refused, with
// OpenAI's status and no Go type names in the message.
func TestOpenAIConformance(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: okAnswer("hi")})
	for _, tc := range []struct {
		name, path, body string
		param            string
	}{
		{"embeddings input empty string", "/v1/embeddings", `{"input":""}`, "input"},
		{"embeddings input null", "/v1/embeddings", `{"input":null}`, "input"},
		{"embeddings input missing", "/v1/embeddings", `{"model":"tiny"}`, "input"},
		{"embeddings input empty list", "/v1/embeddings", `{"input":[]}`, "input"},
		{"embeddings input empty item", "/v1/embeddings", `{"input":["a",""]}`, "input"},
		{"chat stream_options without stream", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}`, "stream_options"},
		{"completion stream_options without stream", "/v1/completions", `{"prompt":"hi","stream":false,"stream_options":{"include_usage":true}}`, "stream_options"},
		{"chat logit_bias", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"logit_bias":{"50256":-100}}`, "logit_bias"},
		{"completion logit_bias", "/v1/completions", `{"prompt":"hi","logit_bias":{"50256":-100}}`, "logit_bias"},
		{"top_logprobs", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"top_logprobs":3}`, "top_logprobs"},
		{"body not an object", "/v1/chat/completions", `[1,2]`, ""},
		{"temperature a string", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"temperature":"hot"}`, "temperature"},
		{"max_tokens a string", "/v1/completions", `{"prompt":"hi","max_tokens":"8"}`, "max_tokens"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			resp := post(t, srv.URL+tc.path, "", tc.body)
			raw, _ := io.ReadAll(resp.Body)
			var e errorBody
			if err := json.Unmarshal(raw, &e); err != nil {
				t.Fatalf("%d %s", resp.StatusCode, raw)
			}
			if resp.StatusCode != 400 || e.Error.Type != "invalid_request_error" {
				t.Fatalf("got %d %s, want 400", resp.StatusCode, raw)
			}
			if got := ""; e.Error.Param != nil {
				got = *e.Error.Param
				if got != tc.param {
					t.Fatalf("param %q, want %q", got, tc.param)
				}
			} else if tc.param != "" {
				t.Fatalf("no param, want %q", tc.param)
			}
			for _, goish := range []string{"gateway.", "float64", "int64", "*int", "struct", "Go value"} {
				if strings.Contains(e.Error.Message, goish) {
					t.Fatalf("the message names a Go type (%q): %s", goish, e.Error.Message)
				}
			}
		})
	}
	// Refusals are not published; what OpenAI accepts still is.
	b.mu.Lock()
	n := len(b.sent)
	b.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d refused requests were published", n)
	}
	for _, body := range []string{
		`{"messages":[{"role":"user","content":"hi"}],"logit_bias":{},"top_logprobs":null,"stream_options":null}`,
		`{"messages":[{"role":"user","content":"hi"}],"logit_bias":null,"logprobs":false}`,
	} {
		if resp := post(t, srv.URL+"/v1/chat/completions", "", body); resp.StatusCode != 200 {
			t.Fatalf("%s: %d", body, resp.StatusCode)
		}
	}
}

// Item 13: the Bearer scheme is case-insensitive.
func TestBearerSchemeAnyCase(t *testing.T) {
	t.Parallel()
	srv, _ := setup(t, setupOpts{keys: keyLine("alice", testKey, ""), answer: okAnswer("hi")})
	for _, scheme := range []string{"Bearer", "bearer", "BEARER"} {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+"/v1/models", nil)
		req.Header.Set("Authorization", scheme+" "+testKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("Authorization: %s <key>: %d, want 200", scheme, resp.StatusCode)
		}
	}
}

// Item 13: a stream whose answer is empty still sends the role delta
// first, then the finish chunk and [DONE].
func TestEmptyStreamSendsRole(t *testing.T) {
	t.Parallel()
	srv, _ := setup(t, setupOpts{answer: okAnswer("")})
	resp := post(t, srv.URL+"/v1/chat/completions", "", `{"messages":[{"role":"user","content":"hi"}],"stream":true}`)
	data, _ := events(t, resp)
	if len(data) < 3 || data[len(data)-1] != "[DONE]" {
		t.Fatalf("events %q", data)
	}
	var d struct {
		Choices []struct {
			Delta struct {
				Role    string  `json:"role"`
				Content *string `json:"content"`
			} `json:"delta"`
		} `json:"choices"`
	}
	if err := json.Unmarshal([]byte(data[0]), &d); err != nil || len(d.Choices) != 1 || d.Choices[0].Delta.Role != "assistant" {
		t.Fatalf("first event %s: no role delta", data[0])
	}
}

// Item 13: "//v1/models" (a base URL ending in a slash) is served, not a
// 307 with an HTML body.
func TestDoubleSlashPath(t *testing.T) {
	t.Parallel()
	srv, _ := setup(t, setupOpts{})
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Get(srv.URL + "//v1/models")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got := decode[modelList](t, resp)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" || len(got.Data) != 2 {
		t.Fatalf("GET //v1/models: %d %s %+v", resp.StatusCode, resp.Header.Get("Content-Type"), got)
	}
}

// Item 11: an engine's error text (hosts, paths, stack lines) never
// reaches the client; the client gets a sentence and the request id, which
// the X-Request-Id header repeats.
func TestEngineErrorStaysInTheLogs(t *testing.T) {
	t.Parallel()
	const detail = "Post \"http://ollama-7f9c.internal:11434/api/chat\": dial tcp 10.2.3.4:11434: connection refused\ngoroutine 12 [running]:\n/src/internal/worker/run.go:88"
	for _, tc := range []struct {
		name, code string
		status     int
		stream     bool
	}{
		{"engine failure", "max_attempts", 502, false},
		{"engine failure in a stream", "max_attempts", 502, true},
		{"engine rejected", "engine_rejected", 400, false},
		{"expired", wire.ReasonExpired, 504, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, _ := setup(t, setupOpts{answer: func(m Message, c *fakeCall) {
				c.push(false, wire.ErrorResult(m.ID, "tiny", tc.code, detail))
			}})
			body := `{"messages":[{"role":"user","content":"hi"}]}`
			if tc.stream {
				body = `{"messages":[{"role":"user","content":"hi"}],"stream":true}`
			}
			resp := post(t, srv.URL+"/v1/chat/completions", "", body)
			raw, _ := io.ReadAll(resp.Body)
			id := resp.Header.Get("X-Request-Id")
			if id == "" {
				t.Fatal("no X-Request-Id header")
			}
			if !tc.stream && resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, raw)
			}
			for _, leak := range []string{"ollama-7f9c", "10.2.3.4", "goroutine", "run.go", "connection refused"} {
				if strings.Contains(string(raw), leak) {
					t.Fatalf("the engine's error reached the client (%q): %s", leak, raw)
				}
			}
			if !strings.Contains(string(raw), id) {
				t.Fatalf("the error does not name the request id %s: %s", id, raw)
			}
		})
	}
}
