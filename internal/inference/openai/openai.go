package openai

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/secret"
)

// Prompt batching modes.
const (
	BatchAuto   = "auto"   // try a list; fall back to single calls on 4xx
	BatchList   = "list"   // always one call with a list of prompts
	BatchSingle = "single" // always one call per prompt
)

// Config configures an Engine.
type Config struct {
	// URL is the server, with or without the trailing /v1.
	URL string
	// APIKey is sent as a bearer token when set.
	APIKey secret.Value
	// BatchPrompts is auto, list or single (default auto).
	BatchPrompts string
}

// Engine calls an OpenAI-compatible server.
type Engine struct {
	base   string // ends in /v1
	key    secret.Value
	mode   string
	list   atomic.Int32 // 0 unknown, 1 lists work, -1 lists refused
	client *http.Client
}

// New returns an Engine.
func New(cfg Config) (*Engine, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("engine URL %q is not an http(s) URL", cfg.URL)
	}
	base := strings.TrimSuffix(u.String(), "/")
	if !strings.HasSuffix(base, "/v1") {
		base += "/v1"
	}
	mode := cfg.BatchPrompts
	if mode == "" {
		mode = BatchAuto
	}
	if mode != BatchAuto && mode != BatchList && mode != BatchSingle {
		return nil, fmt.Errorf("prompt batching mode %q is not auto, list or single", mode)
	}
	return &Engine{base: base, key: cfg.APIKey, mode: mode, client: &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
	}}}, nil
}

// Infer runs reqs, which share a kind, model and options.
func (e *Engine) Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	switch {
	case reqs[0].Kind == inference.Embed:
		return e.embed(ctx, reqs)
	case reqs[0].Kind == inference.Generate && len(reqs) > 1 && reqs[0].Stream == nil && e.useList():
		res, err := e.completionsList(ctx, reqs)
		var ie *inference.Error
		if e.mode == BatchAuto && errors.As(err, &ie) && ie.Status >= 400 && ie.Status < 500 && ie.Status != http.StatusTooManyRequests && ie.Status != http.StatusNotFound {
			// The server refuses a list of prompts: remember, and fall back.
			e.list.Store(-1)
			return e.each(ctx, reqs), nil
		}
		if err == nil {
			e.list.Store(1)
		}
		return res, err
	default:
		return e.each(ctx, reqs), nil
	}
}

func (e *Engine) useList() bool {
	switch e.mode {
	case BatchList:
		return true
	case BatchSingle:
		return false
	}
	return e.list.Load() >= 0
}

// ListSupported reports what auto mode learned: 1 lists work, -1 refused,
// 0 not yet known.
func (e *Engine) ListSupported() int { return int(e.list.Load()) }

func (e *Engine) each(ctx context.Context, reqs []inference.Request) []inference.Result {
	out := make([]inference.Result, len(reqs))
	var g errgroup.Group
	for i := range reqs {
		g.Go(func() error {
			defer inference.Recover(&out[i].Err)
			out[i].Response, out[i].Err = e.one(ctx, reqs[i])
			return nil
		})
	}
	_ = g.Wait()
	return out
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
}

type choice struct {
	Index        int    `json:"index"`
	Text         string `json:"text"`
	FinishReason string `json:"finish_reason"`
	Message      *struct {
		Role      string     `json:"role"`
		Content   string     `json:"content"`
		ToolCalls []toolCall `json:"tool_calls"`
	} `json:"message"`
	Delta *struct {
		Content   string     `json:"content"`
		ToolCalls []toolCall `json:"tool_calls"`
	} `json:"delta"`
}

type completion struct {
	Choices []choice `json:"choices"`
	Usage   *usage   `json:"usage"`
}

func (e *Engine) one(ctx context.Context, r inference.Request) (inference.Response, error) {
	body := params(r)
	path := "/completions"
	if r.Kind == inference.Chat {
		path = "/chat/completions"
		body["messages"] = messages(r)
		if len(r.Tools) > 0 {
			body["tools"] = r.Tools
		}
		if len(r.ToolChoice) > 0 {
			body["tool_choice"] = r.ToolChoice
		}
	} else {
		prompt := r.Prompt
		if r.System != "" {
			prompt = r.System + "\n\n" + r.Prompt
		}
		body["prompt"] = prompt
	}
	if r.Stream != nil {
		return e.stream(ctx, path, body, r)
	}
	var c completion
	if err := e.post(ctx, path, body, &c); err != nil {
		return inference.Response{}, err
	}
	if len(c.Choices) == 0 {
		return inference.Response{}, &inference.Error{Kind: inference.Retryable, Code: "engine_error", Err: errors.New("engine answered no choices")}
	}
	return toResponse(r.Kind, c.Choices[0], c.Usage), nil
}

func toResponse(kind inference.Kind, c choice, u *usage) inference.Response {
	resp := inference.Response{DoneReason: c.FinishReason}
	if u != nil {
		resp.Usage = inference.Usage{InputTokens: u.PromptTokens, OutputTokens: u.CompletionTokens}
	}
	if kind == inference.Chat {
		m := inference.Message{Role: "assistant"}
		if c.Message != nil {
			m.Content = c.Message.Content
			m.ToolCalls = fromToolCalls(c.Message.ToolCalls)
		}
		if len(m.ToolCalls) > 0 {
			resp.DoneReason = inference.DoneToolCalls
		}
		resp.Message = &m
	} else {
		resp.Text = c.Text
	}
	return resp
}

// completionsList sends every prompt of the batch in one call.
func (e *Engine) completionsList(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	body := params(reqs[0])
	prompts := make([]string, len(reqs))
	for i, r := range reqs {
		prompts[i] = r.Prompt
		if r.System != "" {
			prompts[i] = r.System + "\n\n" + r.Prompt
		}
	}
	body["prompt"] = prompts
	var c completion
	if err := e.post(ctx, "/completions", body, &c); err != nil {
		return nil, err
	}
	out := make([]inference.Result, len(reqs))
	seen := make([]bool, len(reqs))
	for _, ch := range c.Choices {
		if ch.Index < 0 || ch.Index >= len(reqs) || seen[ch.Index] {
			return nil, &inference.Error{Kind: inference.Retryable, Code: "engine_error", Err: fmt.Errorf("engine answered choice index %d for %d prompts", ch.Index, len(reqs))}
		}
		seen[ch.Index] = true
		out[ch.Index].Response = toResponse(inference.Generate, ch, nil)
	}
	for i, ok := range seen {
		if !ok {
			out[i].Err = &inference.Error{Kind: inference.Retryable, Code: "engine_error", Err: fmt.Errorf("engine answered no choice for prompt %d", i)}
		}
	}
	if c.Usage != nil {
		// The usage covers the whole call; share it out evenly.
		for i := range out {
			out[i].Response.Usage = inference.Usage{InputTokens: c.Usage.PromptTokens / len(reqs), OutputTokens: c.Usage.CompletionTokens / len(reqs)}
		}
	}
	return out, nil
}

func (e *Engine) embed(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	var inputs []string
	for _, r := range reqs {
		inputs = append(inputs, r.Input...)
	}
	var res struct {
		Data []struct {
			Index     int       `json:"index"`
			Embedding []float32 `json:"embedding"`
		} `json:"data"`
		Usage *usage `json:"usage"`
	}
	if err := e.post(ctx, "/embeddings", map[string]any{"model": reqs[0].Model, "input": inputs}, &res); err != nil {
		return nil, err
	}
	vecs := make([][]float32, len(inputs))
	for _, d := range res.Data {
		if d.Index < 0 || d.Index >= len(inputs) {
			return nil, &inference.Error{Kind: inference.Retryable, Code: "engine_error", Err: fmt.Errorf("engine answered embedding index %d for %d inputs", d.Index, len(inputs))}
		}
		vecs[d.Index] = d.Embedding
	}
	out := make([]inference.Result, len(reqs))
	at := 0
	for i, r := range reqs {
		n := len(r.Input)
		out[i].Response = inference.Response{Embeddings: vecs[at : at+n : at+n], DoneReason: "stop"}
		if res.Usage != nil {
			out[i].Response.Usage.InputTokens = res.Usage.PromptTokens * n / len(inputs)
		}
		at += n
	}
	return out, nil
}

// params maps sous options onto OpenAI parameters. Names OpenAI lacks
// (top_k, min_p, repetition_penalty) are sent as vLLM's extra sampling
// parameters only when the request sets them.
func params(r inference.Request) map[string]any {
	p := map[string]any{"model": r.Model}
	for k, v := range r.Options {
		switch k {
		case "num_predict":
			p["max_tokens"] = v
		case "repeat_penalty":
			p["repetition_penalty"] = v
		case "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "top_k", "min_p":
			p[k] = v
		}
	}
	if len(r.Format) > 0 {
		var s string
		if json.Unmarshal(r.Format, &s) == nil {
			p["response_format"] = map[string]any{"type": "json_object"}
		} else {
			p["response_format"] = map[string]any{"type": "json_schema", "json_schema": map[string]any{"name": "output", "schema": r.Format}}
		}
	}
	return p
}

func (e *Engine) request(ctx context.Context, path string, body any) (*http.Response, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, &inference.Error{Kind: inference.Permanent, Code: "engine_rejected", Err: err}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.base+path, bytes.NewReader(b))
	if err != nil {
		return nil, &inference.Error{Kind: inference.Permanent, Code: "engine_rejected", Err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	if !e.key.IsZero() {
		req.Header.Set("Authorization", "Bearer "+e.key.Reveal())
	}
	resp, err := e.client.Do(req)
	if err != nil {
		return nil, inference.Classify(0, "", scrubbed{err, e.key})
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		msg := errorMessage(resp.Body)
		return nil, inference.Classify(resp.StatusCode, msg, fmt.Errorf("%s %s: %s", path, resp.Status, secret.Scrub(msg, e.key)))
	}
	return resp, nil
}

func (e *Engine) post(ctx context.Context, path string, body, out any) error {
	resp, err := e.request(ctx, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 256<<20)).Decode(out); err != nil {
		return inference.Classify(0, "", fmt.Errorf("decode %s answer: %w", path, err))
	}
	return nil
}

// stream reads server-sent events and hands deltas to r.Stream.
func (e *Engine) stream(ctx context.Context, path string, body map[string]any, r inference.Request) (inference.Response, error) {
	body["stream"] = true
	body["stream_options"] = map[string]any{"include_usage": true}
	resp, err := e.request(ctx, path, body)
	if err != nil {
		return inference.Response{}, err
	}
	defer resp.Body.Close()
	var text strings.Builder
	var parts callParts
	out := inference.Response{}
	finished := false // [DONE] or a finish_reason: the answer is whole
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 8<<20)
	for sc.Scan() {
		line := sc.Text()
		data, ok := strings.CutPrefix(line, "data:")
		if !ok {
			continue
		}
		data = strings.TrimSpace(data)
		if data == "[DONE]" {
			finished = true
			break
		}
		var c completion
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			return inference.Response{}, inference.Classify(0, "", fmt.Errorf("decode stream event: %w", err))
		}
		if c.Usage != nil {
			out.Usage = inference.Usage{InputTokens: c.Usage.PromptTokens, OutputTokens: c.Usage.CompletionTokens}
		}
		for _, ch := range c.Choices {
			delta := ch.Text
			if ch.Delta != nil {
				delta = ch.Delta.Content
				parts.add(ch.Delta.ToolCalls)
			}
			if delta != "" {
				text.WriteString(delta)
				r.Stream(delta)
			}
			if ch.FinishReason != "" {
				out.DoneReason = ch.FinishReason
				finished = true
			}
		}
	}
	if err := sc.Err(); err != nil {
		return inference.Response{}, inference.Classify(0, "", fmt.Errorf("read stream: %w", err))
	}
	if !finished {
		return inference.Response{}, &inference.Error{Kind: inference.Retryable, Code: "engine_error", Err: errors.New("the stream ended before the engine finished the answer (engine stopped?)")}
	}
	if r.Kind == inference.Chat {
		// Tool calls arrive in pieces; they go on as whole calls, once the
		// engine has finished them.
		calls := parts.done()
		if len(calls) > 0 {
			out.DoneReason = inference.DoneToolCalls
			if r.StreamToolCalls != nil {
				r.StreamToolCalls(calls)
			}
		}
		out.Message = &inference.Message{Role: "assistant", Content: text.String(), ToolCalls: calls}
	} else {
		out.Text = text.String()
	}
	return out, nil
}

func errorMessage(r io.Reader) string {
	b, _ := io.ReadAll(io.LimitReader(r, 64<<10))
	var v struct {
		Error   json.RawMessage `json:"error"`
		Message string          `json:"message"`
	}
	if json.Unmarshal(b, &v) == nil {
		var s string
		if json.Unmarshal(v.Error, &s) == nil && s != "" {
			return s
		}
		var o struct {
			Message string `json:"message"`
		}
		if json.Unmarshal(v.Error, &o) == nil && o.Message != "" {
			return o.Message
		}
		if v.Message != "" {
			return v.Message
		}
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 300 {
		s = s[:300]
	}
	return s
}

// Ping checks that the server answers /v1/models.
func (e *Engine) Ping(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, e.base+"/models", nil)
	if err != nil {
		return err
	}
	if !e.key.IsZero() {
		req.Header.Set("Authorization", "Bearer "+e.key.Reveal())
	}
	resp, err := e.client.Do(req)
	if err != nil {
		return inference.Classify(0, "", scrubbed{err, e.key})
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode >= 300 {
		return inference.Classify(resp.StatusCode, resp.Status, fmt.Errorf("GET /v1/models: %s", resp.Status))
	}
	return nil
}

// scrubbed is an error whose text never shows the API key but which still
// unwraps, so timeouts and cancellations are classified as what they are.
type scrubbed struct {
	err error
	key secret.Value
}

func (s scrubbed) Error() string { return secret.Scrub(s.err.Error(), s.key) }
func (s scrubbed) Unwrap() error { return s.err }
