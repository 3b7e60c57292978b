package gateway

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/wire"
)

const testKey = "sk-test-0123456789"

func keyLine(name, key, extra string) string {
	sum := sha256.Sum256([]byte(key))
	return name + " " + hex.EncodeToString(sum[:]) + " " + extra + "\n"
}

type setupOpts struct {
	keys   string // keys file content; empty: no auth
	cfg    func(*Config)
	answer func(Message, *fakeCall)
	err    error
}

func setup(t *testing.T, o setupOpts) (*httptest.Server, *fakeBroker) {
	t.Helper()
	cfg := Config{Queue: "q", Model: "tiny", Models: []string{"tiny", "other"}, Timeout: 5 * time.Second,
		MaxBodyBytes: 4096, MaxPromptBytes: 1024, MaxNumPredict: 64}
	if o.cfg != nil {
		o.cfg(&cfg)
	}
	if o.keys != "" {
		path := filepath.Join(t.TempDir(), "keys")
		if err := os.WriteFile(path, []byte(o.keys), 0o600); err != nil {
			t.Fatal(err)
		}
		var names []string
		if len(cfg.Lanes) > 0 {
			names = lanes.Names(cfg.Lanes)
		}
		k, err := LoadKeys(path, 0, names, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Keys = k
	}
	b := &fakeBroker{answer: o.answer, err: o.err}
	srv := httptest.NewServer(New(cfg, b, slog.New(slog.DiscardHandler)))
	t.Cleanup(srv.Close)
	return srv, b
}

func post(t *testing.T, url, key, body string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	req.Header.Set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func decode[T any](t *testing.T, resp *http.Response) T {
	t.Helper()
	var v T
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("%v: %s", err, b)
	}
	return v
}

func okAnswer(text string) func(Message, *fakeCall) {
	return func(m Message, c *fakeCall) {
		var r wire.Request
		_ = json.Unmarshal(m.Body, &r)
		res := wire.Result{ID: m.ID, Status: wire.StatusOK, Model: r.Model, DoneReason: "length",
			Usage: &inference.Usage{InputTokens: 7, OutputTokens: 3}}
		switch {
		case r.Messages != nil:
			res.Message = &inference.Message{Role: "assistant", Content: text}
		case r.Prompt != nil:
			res.Response = &text
		default:
			res.Embeddings = [][]float32{{0.5, -1.25}, {3}}
		}
		if r.Stream {
			for i, part := range strings.SplitAfter(text, " ") {
				c.push(true, wire.Chunk{ID: m.ID, Seq: i, Delta: part, Attempt: 1})
			}
			done := true
			res.Done = &done
		}
		c.push(false, res)
	}
}

func TestChatCompletion(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: okAnswer("hello there")})
	resp := post(t, srv.URL+"/v1/chat/completions", "", `{"model":"other","messages":[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":8,"temperature":0.2,"stop":"\n","seed":3}`)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	got := decode[chatCompletion](t, resp)
	if got.Object != "chat.completion" || !strings.HasPrefix(got.ID, "chatcmpl-") || got.Model != "other" || got.Created == 0 {
		t.Fatalf("envelope: %+v", got)
	}
	if len(got.Choices) != 1 || got.Choices[0].Message.Content == nil || *got.Choices[0].Message.Content != "hello there" || got.Choices[0].Message.Role != "assistant" || got.Choices[0].FinishReason != "length" {
		t.Fatalf("choices: %+v", got.Choices)
	}
	if got.Usage != (usage{PromptTokens: 7, CompletionTokens: 3, TotalTokens: 10}) {
		t.Fatalf("usage: %+v", got.Usage)
	}
	r := b.last(t)
	if r.Model != "other" || len(r.Messages) != 2 || r.Messages[0].Role != "system" || r.Messages[1].Content != "hi" || r.Deadline == nil || r.Stream {
		t.Fatalf("published %+v", r)
	}
	if r.Options["num_predict"] != float64(8) || r.Options["temperature"] != 0.2 || r.Options["seed"] != float64(3) {
		t.Fatalf("options %v", r.Options)
	}
	if until := time.Until(*r.Deadline); until <= 0 || until > 5*time.Second {
		t.Fatalf("deadline %s away, want within the 5s timeout", until)
	}
	tp := b.sent[0].Headers["traceparent"]
	if !strings.HasPrefix(tp, "00-4bf92f3577b34da6a3ce929d0e0e4736-") {
		t.Fatalf("traceparent %q does not continue the client's trace", tp)
	}
}

// events reads an SSE body: data payloads, and the number of comments.
func events(t *testing.T, resp *http.Response) (data []string, comments int) {
	t.Helper()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, ":"):
			comments++
		case strings.HasPrefix(line, "data: "):
			data = append(data, strings.TrimPrefix(line, "data: "))
		case strings.HasPrefix(line, "event: "): // the Responses API's
		case line == "":
		default:
			t.Fatalf("unexpected SSE line %q", line)
		}
	}
	return data, comments
}

func TestChatStream(t *testing.T) {
	t.Parallel()
	srv, _ := setup(t, setupOpts{answer: okAnswer("one two three")})
	resp := post(t, srv.URL+"/v1/chat/completions", "", `{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}`)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d, %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	data, comments := events(t, resp)
	if comments < 1 {
		t.Fatal("no SSE comment before the first chunk")
	}
	if data[len(data)-1] != "[DONE]" {
		t.Fatalf("last event %q, want [DONE]", data[len(data)-1])
	}
	var text strings.Builder
	var finish string
	var u *usage
	for i, d := range data[:len(data)-1] {
		var raw map[string]json.RawMessage
		if err := json.Unmarshal([]byte(d), &raw); err != nil {
			t.Fatal(err)
		}
		if string(raw["object"]) != `"chat.completion.chunk"` {
			t.Fatalf("event %d object %s", i, raw["object"])
		}
		if _, ok := raw["usage"]; !ok {
			t.Fatalf("event %d has no usage field with include_usage", i)
		}
		var c struct {
			Choices []chatChunkChoice `json:"choices"`
			Usage   *usage            `json:"usage"`
		}
		_ = json.Unmarshal([]byte(d), &c)
		if i == 0 && (len(c.Choices) != 1 || c.Choices[0].Delta.Role != "assistant") {
			t.Fatalf("first chunk has no assistant role: %s", d)
		}
		if c.Usage != nil {
			if len(c.Choices) != 0 || i != len(data)-2 {
				t.Fatalf("usage on a chunk that is not the last, or with choices: %s", d)
			}
			u = c.Usage
		}
		for _, ch := range c.Choices {
			if ch.Delta.Content != nil {
				text.WriteString(*ch.Delta.Content)
			}
			if ch.FinishReason != nil {
				finish = *ch.FinishReason
			}
		}
	}
	if text.String() != "one two three" || finish != "length" || u == nil || u.TotalTokens != 10 {
		t.Fatalf("text %q finish %q usage %+v", text.String(), finish, u)
	}
}

func TestStreamKeepAliveWhileWaiting(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv, _ := setup(t, setupOpts{
		cfg: func(c *Config) { c.KeepAlive = 5 * time.Millisecond },
		answer: func(m Message, c *fakeCall) {
			<-release
			okAnswer("late")(m, c)
		},
	})
	resp := post(t, srv.URL+"/v1/completions", "", `{"prompt":"hi","stream":true}`)
	br := bufio.NewReader(resp.Body)
	comments := 0
	for comments < 3 {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(line, ":") {
			comments++
		}
	}
	close(release)
	rest, _ := io.ReadAll(br)
	if !strings.Contains(string(rest), `"object":"text_completion"`) || !strings.HasSuffix(string(rest), "data: [DONE]\n\n") {
		t.Fatalf("stream after the wait: %s", rest)
	}
}

func TestCompletion(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: okAnswer("a b")})
	resp := post(t, srv.URL+"/v1/completions", "", `{"model":"tiny","prompt":["once"],"max_tokens":4}`)
	got := decode[textCompletion](t, resp)
	if got.Object != "text_completion" || !strings.HasPrefix(got.ID, "cmpl-") || len(got.Choices) != 1 || got.Choices[0].Text != "a b" || *got.Choices[0].FinishReason != "length" || got.Usage.TotalTokens != 10 {
		t.Fatalf("%+v", got)
	}
	if r := b.last(t); r.Prompt == nil || *r.Prompt != "once" {
		t.Fatalf("published %+v", r)
	}
}

func TestEmbeddings(t *testing.T) {
	t.Parallel()
	srv, _ := setup(t, setupOpts{answer: okAnswer("")})
	for _, format := range []string{"float", "base64"} {
		resp := post(t, srv.URL+"/v1/embeddings", "", `{"model":"tiny","input":["a","b"],"encoding_format":"`+format+`"}`)
		got := decode[struct {
			Object string `json:"object"`
			Data   []struct {
				Object    string          `json:"object"`
				Embedding json.RawMessage `json:"embedding"`
				Index     int             `json:"index"`
			} `json:"data"`
			Model string     `json:"model"`
			Usage embedUsage `json:"usage"`
		}](t, resp)
		if got.Object != "list" || len(got.Data) != 2 || got.Data[1].Index != 1 || got.Data[0].Object != "embedding" || got.Usage.PromptTokens != 7 {
			t.Fatalf("%s: %+v", format, got)
		}
		var v []float32
		if format == "float" {
			_ = json.Unmarshal(got.Data[0].Embedding, &v)
		} else {
			var s string
			_ = json.Unmarshal(got.Data[0].Embedding, &s)
			raw, _ := base64.StdEncoding.DecodeString(s)
			for i := 0; i+4 <= len(raw); i += 4 {
				v = append(v, math.Float32frombits(binary.LittleEndian.Uint32(raw[i:])))
			}
		}
		if len(v) != 2 || v[0] != 0.5 || v[1] != -1.25 {
			t.Fatalf("%s: vector %v", format, v)
		}
	}
}

func TestModelsAndKeys(t *testing.T) {
	t.Parallel()
	keys := "# team keys\n\n" + keyLine("alice", testKey, "") + keyLine("bob", "sk-bob", "models=other") + keyLine("slow", "sk-slow", "rate=0.001")
	srv, _ := setup(t, setupOpts{keys: keys, answer: okAnswer("x")})
	get := func(key, path string) *http.Response {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+path, nil)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	for _, tc := range []struct {
		key  string
		want []string
	}{{testKey, []string{"tiny", "other"}}, {"sk-bob", []string{"other"}}} {
		got := decode[modelList](t, get(tc.key, "/v1/models"))
		var ids []string
		for _, m := range got.Data {
			if m.Object != "model" {
				t.Fatalf("%+v", m)
			}
			ids = append(ids, m.ID)
		}
		if got.Object != "list" || fmt.Sprint(ids) != fmt.Sprint(tc.want) {
			t.Fatalf("key %s sees %v, want %v", tc.key[:4], ids, tc.want)
		}
	}
	if r := get("sk-bob", "/v1/models/tiny"); r.StatusCode != 404 {
		t.Fatalf("bob retrieves tiny: %d", r.StatusCode)
	}
	for _, key := range []string{"", "sk-wrong", strings.ToUpper(testKey)} {
		resp := post(t, srv.URL+"/v1/chat/completions", key, `{"messages":[{"role":"user","content":"hi"}]}`)
		e := decode[errorBody](t, resp)
		if resp.StatusCode != 401 || *e.Error.Code != "invalid_api_key" {
			t.Fatalf("key %q: %d %+v", key, resp.StatusCode, e)
		}
	}
	if resp := post(t, srv.URL+"/v1/chat/completions", "sk-bob", `{"model":"tiny","messages":[{"role":"user","content":"hi"}]}`); resp.StatusCode != 404 {
		t.Fatalf("bob asks for tiny: %d", resp.StatusCode)
	}
	if resp := post(t, srv.URL+"/v1/chat/completions", "sk-slow", `{"messages":[{"role":"user","content":"hi"}]}`); resp.StatusCode != 200 {
		t.Fatalf("first request of a rate-limited key: %d", resp.StatusCode)
	}
	resp := post(t, srv.URL+"/v1/chat/completions", "sk-slow", `{"messages":[{"role":"user","content":"hi"}]}`)
	if e := decode[errorBody](t, resp); resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" || *e.Error.Code != "rate_limit_exceeded" {
		t.Fatalf("second request: %d %q %+v", resp.StatusCode, resp.Header.Get("Retry-After"), e)
	}
}

func TestErrors(t *testing.T) {
	t.Parallel()
	never := func(Message, *fakeCall) {}
	for _, tc := range []struct {
		name   string
		path   string
		body   string
		opts   setupOpts
		status int
		code   string
		param  string
	}{
		{"unknown model", "/v1/chat/completions", `{"model":"gpt-9","messages":[{"role":"user","content":"hi"}]}`, setupOpts{}, 404, "model_not_found", "model"},
		{"not JSON", "/v1/chat/completions", `{"messages":`, setupOpts{}, 400, "invalid_request", ""},
		{"wrong type", "/v1/chat/completions", `{"messages":"hi"}`, setupOpts{}, 400, "invalid_request", "messages"},
		{"no messages", "/v1/chat/completions", `{"messages":[]}`, setupOpts{}, 400, "invalid_request", "messages"},
		{"bad role", "/v1/chat/completions", `{"messages":[{"role":"robot","content":"hi"}]}`, setupOpts{}, 400, "invalid_value", "messages[0].role"},
		{"n=2", "/v1/chat/completions", `{"n":2,"messages":[{"role":"user","content":"hi"}]}`, setupOpts{}, 400, "invalid_request", "n"},
		{"image part", "/v1/chat/completions", `{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}`, setupOpts{}, 400, "invalid_request", "messages[0].content"},
		{"max_tokens beyond any limit", "/v1/completions", `{"prompt":"hi","max_tokens":10000000000}`, setupOpts{}, 400, "invalid_option", ""},
		{"negative temperature", "/v1/completions", `{"prompt":"hi","temperature":-1}`, setupOpts{}, 400, "invalid_option", ""},
		{"token prompt", "/v1/completions", `{"prompt":[1,2,3]}`, setupOpts{}, 400, "invalid_request", "prompt"},
		{"prompt too large", "/v1/completions", `{"prompt":"` + strings.Repeat("x", 2000) + `"}`, setupOpts{}, 400, "context_length_exceeded", ""},
		{"body too large", "/v1/completions", `{"prompt":"` + strings.Repeat("x", 5000) + `"}`, setupOpts{}, 413, "body_too_large", ""},
		{"embedding dimensions", "/v1/embeddings", `{"input":"a","dimensions":3}`, setupOpts{}, 400, "invalid_request", "dimensions"},
		{"queue full", "/v1/completions", `{"prompt":"hi"}`, setupOpts{err: fmt.Errorf("publish: %w", ErrQueueFull)}, 429, "queue_full", ""},
		{"no queue", "/v1/completions", `{"prompt":"hi"}`, setupOpts{err: ErrNoQueue}, 503, "service_unavailable", ""},
		{"broker down", "/v1/completions", `{"prompt":"hi"}`, setupOpts{err: ErrUnavailable}, 503, "service_unavailable", ""},
		{"no answer in time", "/v1/completions", `{"prompt":"hi"}`, setupOpts{answer: never, cfg: func(c *Config) { c.Timeout = 50 * time.Millisecond }}, 504, "timeout", ""},
		{"connection lost while waiting", "/v1/completions", `{"prompt":"hi"}`, setupOpts{answer: func(_ Message, c *fakeCall) { c.fail(ErrUnavailable) }}, 503, "service_unavailable", ""},
		{"worker error result", "/v1/completions", `{"prompt":"hi"}`, setupOpts{answer: func(m Message, c *fakeCall) {
			c.push(false, wire.ErrorResult(m.ID, "tiny", "max_attempts", "engine down"))
		}}, 502, "max_attempts", ""},
		{"worker deadline", "/v1/completions", `{"prompt":"hi"}`, setupOpts{answer: func(m Message, c *fakeCall) {
			c.push(false, wire.ErrorResult(m.ID, "tiny", wire.ReasonExpired, "late"))
		}}, 504, "timeout", ""},
		{"unknown URL", "/v1/images/generations", `{}`, setupOpts{}, 404, "unknown_url", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, b := setup(t, tc.opts)
			resp := post(t, srv.URL+tc.path, "", tc.body)
			e := decode[errorBody](t, resp)
			if resp.StatusCode != tc.status || e.Error.Code == nil || *e.Error.Code != tc.code || e.Error.Message == "" || e.Error.Type == "" {
				t.Fatalf("got %d %+v, want %d %s", resp.StatusCode, e.Error, tc.status, tc.code)
			}
			if (e.Error.Param == nil && tc.param != "") || (e.Error.Param != nil && *e.Error.Param != tc.param) {
				t.Fatalf("param %v, want %q", e.Error.Param, tc.param)
			}
			if tc.status == 429 && resp.Header.Get("Retry-After") != "5" {
				t.Fatalf("Retry-After %q, want 5", resp.Header.Get("Retry-After"))
			}
			if tc.status == 400 || tc.status == 404 || tc.status == 413 {
				b.mu.Lock()
				n := len(b.sent)
				b.mu.Unlock()
				if n != 0 {
					t.Fatal("an invalid request was published")
				}
			}
		})
	}
}

// A stream that fails after the 200 ends with an error event, which
// OpenAI's clients raise as an APIError.
func TestStreamErrorEvent(t *testing.T) {
	t.Parallel()
	srv, _ := setup(t, setupOpts{answer: func(m Message, c *fakeCall) {
		c.push(true, wire.Chunk{ID: m.ID, Seq: 0, Delta: "par", Attempt: 1})
		c.push(false, wire.ErrorResult(m.ID, "tiny", "max_attempts", "engine down"))
	}})
	resp := post(t, srv.URL+"/v1/chat/completions", "", `{"messages":[{"role":"user","content":"hi"}],"stream":true}`)
	data, _ := events(t, resp)
	last := data[len(data)-1]
	var e errorBody
	if err := json.Unmarshal([]byte(last), &e); err != nil || e.Error.Code == nil || *e.Error.Code != "max_attempts" {
		t.Fatalf("last event %s", last)
	}
}

// A stream restarted on another attempt (a worker died) continues where
// the client is, when the new text extends what was shown.
func TestStreamRestart(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		final   string
		wantErr bool
	}{{"ab cd", false}, {"xy zz", true}} {
		srv, _ := setup(t, setupOpts{answer: func(m Message, c *fakeCall) {
			c.push(true, wire.Chunk{ID: m.ID, Seq: 0, Delta: "ab", Attempt: 1})
			c.push(true, wire.Chunk{ID: m.ID, Seq: 0, Delta: "a", Restart: true, Attempt: 2})
			done := true
			c.push(false, wire.Result{ID: m.ID, Status: wire.StatusOK, Response: &tc.final, Done: &done})
		}})
		resp := post(t, srv.URL+"/v1/completions", "", `{"prompt":"hi","stream":true}`)
		data, _ := events(t, resp)
		var text strings.Builder
		failed := false
		for _, d := range data {
			var c textCompletion
			var e errorBody
			if json.Unmarshal([]byte(d), &e) == nil && e.Error.Message != "" {
				failed = true
			}
			if json.Unmarshal([]byte(d), &c) == nil {
				for _, ch := range c.Choices {
					text.WriteString(ch.Text)
				}
			}
		}
		if failed != tc.wantErr || (!failed && text.String() != tc.final) {
			t.Fatalf("final %q: text %q, failed %v", tc.final, text.String(), failed)
		}
	}
}

// A client that goes away closes its call, so a late result is dropped.
func TestClientGoneClosesCall(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: func(Message, *fakeCall) {}})
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(`{"messages":[{"role":"user","content":"hi"}],"stream":true}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = bufio.NewReader(resp.Body).ReadString('\n') // the first comment: published
	resp.Body.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b.mu.Lock()
		closed := len(b.calls) == 1 && b.calls[0].isClosed()
		b.mu.Unlock()
		if closed {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the call was not closed after the client went away")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestTooManyOpen(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv, b := setup(t, setupOpts{cfg: func(c *Config) { c.MaxOpen = 1 }, answer: func(m Message, c *fakeCall) {
		<-release
		okAnswer("x")(m, c)
	}})
	done := make(chan int)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/completions", strings.NewReader(`{"prompt":"hi"}`))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			done <- 0
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	waitFor(t, func() bool { b.mu.Lock(); defer b.mu.Unlock(); return len(b.sent) == 1 })
	second := post(t, srv.URL+"/v1/completions", "", `{"prompt":"hi"}`)
	close(release)
	if second.StatusCode != 429 {
		t.Fatalf("second open request: %d, want 429", second.StatusCode)
	}
	if s := <-done; s != 200 {
		t.Fatalf("first request: %d", s)
	}
}

func TestMetrics(t *testing.T) {
	t.Parallel()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	srv, _ := setup(t, setupOpts{keys: keyLine("alice", testKey, ""), answer: okAnswer("x"), cfg: func(c *Config) { c.Meter = mp.Meter("test") }})
	post(t, srv.URL+"/v1/completions", testKey, `{"prompt":"hi"}`)
	post(t, srv.URL+"/v1/completions", "sk-wrong", `{"prompt":"hi"}`)
	post(t, srv.URL+"/v1/completions", testKey, `{"model":"nope","prompt":"hi"}`)
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "sous.gateway.requests" {
				continue
			}
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				var parts []string
				for _, kv := range dp.Attributes.ToSlice() {
					parts = append(parts, string(kv.Key)+"="+kv.Value.Emit())
					if strings.Contains(kv.Value.Emit(), "sk-") || strings.Contains(kv.Value.Emit(), "alice") || kv.Value.Emit() == "nope" {
						t.Fatalf("a key, key name or model in a metric label: %v", kv)
					}
				}
				got[strings.Join(parts, ",")] += dp.Value
			}
		}
	}
	for _, want := range []string{
		"error.type=,http.response.status_code=200,http.route=/v1/completions",
		"error.type=invalid_api_key,http.response.status_code=401,http.route=/v1/completions",
		"error.type=model_not_found,http.response.status_code=404,http.route=/v1/completions",
	} {
		if got[want] != 1 {
			t.Errorf("%s: %d, want 1 (all: %v)", want, got[want], got)
		}
	}
}
