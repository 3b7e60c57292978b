package ollama

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/ollama/ollama/api"
	"golang.org/x/sync/errgroup"

	"github.com/sous-run/sous/internal/inference"
)

// Config configures an Engine.
type Config struct {
	// URL is the Ollama server, e.g. http://127.0.0.1:11434.
	URL string
	// KeepAlive is how long Ollama keeps the model loaded after a call
	// (0 leaves Ollama's default).
	KeepAlive time.Duration
}

// Engine calls an Ollama server: generation and chat over its NDJSON API
// with the api package's request and response types, the rest through the
// official client.
type Engine struct {
	client    *api.Client
	http      *http.Client
	base      string
	keepAlive *api.Duration
}

// New returns an Engine for cfg.URL.
func New(cfg Config) (*Engine, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return nil, fmt.Errorf("engine URL %q is not an http(s) URL", cfg.URL)
	}
	hc := &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
	}}
	e := &Engine{client: api.NewClient(u, hc), http: hc, base: strings.TrimSuffix(u.String(), "/")}
	if cfg.KeepAlive > 0 {
		e.keepAlive = &api.Duration{Duration: cfg.KeepAlive}
	}
	return e, nil
}

// Infer runs reqs, which share a kind, model and options. It returns one
// result per request; it returns an error only when the batch as a whole
// cannot run.
func (e *Engine) Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	if reqs[0].Kind == inference.Embed {
		return e.embed(ctx, reqs)
	}
	out := make([]inference.Result, len(reqs))
	var g errgroup.Group // bounded by the batch size, which the caller bounds
	for i := range reqs {
		g.Go(func() error {
			defer inference.Recover(&out[i].Err)
			out[i].Response, out[i].Err = e.one(ctx, reqs[i])
			return nil
		})
	}
	_ = g.Wait()
	return out, nil
}

func (e *Engine) one(ctx context.Context, r inference.Request) (inference.Response, error) {
	stream := r.Stream != nil
	var resp inference.Response
	var err error
	// The client library returns no error when the engine dies mid-stream
	// (the stream just ends), so a call counts only once the engine said it
	// was done.
	done := false
	switch r.Kind {
	case inference.Chat:
		resp, done, err = e.chat(ctx, r)
	default:
		req := &api.GenerateRequest{Model: r.Model, Prompt: r.Prompt, System: r.System, Format: r.Format, Options: r.Options, Stream: &stream, KeepAlive: e.keepAlive}
		var text []byte
		err = e.stream(ctx, "/api/generate", req, func(line []byte) error {
			var gr api.GenerateResponse
			if err := json.Unmarshal(line, &gr); err != nil {
				return inference.Classify(0, "", fmt.Errorf("ollama: decode a generate line: %w", err))
			}
			if stream && gr.Response != "" {
				r.Stream(gr.Response)
			}
			text = append(text, gr.Response...)
			if gr.Done {
				done = true
				resp.DoneReason = gr.DoneReason
				resp.Usage = inference.Usage{InputTokens: gr.PromptEvalCount, OutputTokens: gr.EvalCount}
			}
			return nil
		})
		resp.Text = string(text)
	}
	if err != nil {
		var ie *inference.Error
		if errors.As(err, &ie) {
			return inference.Response{}, ie
		}
		return inference.Response{}, classify(err)
	}
	if !done {
		return inference.Response{}, &inference.Error{Kind: inference.Retryable, Code: "engine_error", Err: errors.New("ollama: the answer ended before the engine said it was done (engine stopped?)")}
	}
	return resp, nil
}

// embed sends every input of the batch in one /api/embed call.
func (e *Engine) embed(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	var inputs []string
	for _, r := range reqs {
		inputs = append(inputs, r.Input...)
	}
	res, err := e.client.Embed(ctx, &api.EmbedRequest{Model: reqs[0].Model, Input: inputs, Options: reqs[0].Options, KeepAlive: e.keepAlive})
	if err != nil {
		return nil, classify(err)
	}
	if len(res.Embeddings) != len(inputs) {
		return nil, &inference.Error{Kind: inference.Retryable, Code: "engine_error", Err: fmt.Errorf("ollama returned %d embeddings for %d inputs", len(res.Embeddings), len(inputs))}
	}
	out := make([]inference.Result, len(reqs))
	at := 0
	for i, r := range reqs {
		n := len(r.Input)
		out[i].Response = inference.Response{Embeddings: res.Embeddings[at : at+n : at+n], DoneReason: "stop"}
		// Ollama counts tokens for the whole call; share them out by input.
		out[i].Response.Usage.InputTokens = res.PromptEvalCount * n / len(inputs)
		at += n
	}
	return out, nil
}

// Ping checks that the server answers.
func (e *Engine) Ping(ctx context.Context) error {
	if _, err := e.client.Version(ctx); err != nil {
		return classify(err)
	}
	return nil
}

// Load asks Ollama to load model into memory now, so the first batch does
// not pay for it.
func (e *Engine) Load(ctx context.Context, model string) error {
	stream := false
	err := e.stream(ctx, "/api/generate", &api.GenerateRequest{Model: model, Stream: &stream, KeepAlive: e.keepAlive}, func([]byte) error { return nil })
	if err != nil {
		return fmt.Errorf("load model %q: %w", model, err)
	}
	return nil
}

func classify(err error) *inference.Error {
	var se api.StatusError
	if errors.As(err, &se) {
		msg := se.ErrorMessage
		if msg == "" {
			msg = se.Status
		}
		return inference.Classify(se.StatusCode, msg, errors.New("ollama: "+msg))
	}
	return inference.Classify(0, "", err)
}
