package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/sous-run/sous/internal/wire"
)

// Config configures a Server. cmd/gateway fills it from the environment.
type Config struct {
	// Queue is the request queue (for span names).
	Queue string
	// Model answers requests that name none; Models are the models clients
	// may ask for (empty: Model only). GET /v1/models lists them.
	Model  string
	Models []string
	// Keys authenticates clients; nil lets everyone in.
	Keys *Keys
	// Timeout bounds the wait for an answer (504 after it); the request's
	// deadline is now + Timeout, so workers skip it once nobody waits.
	Timeout time.Duration
	// KeepAlive is the interval of SSE comments while a stream waits.
	KeepAlive time.Duration
	// RetryAfter is sent with a 429 for a full queue.
	RetryAfter time.Duration
	// MaxOpen bounds the requests held open at once (429 beyond).
	MaxOpen int
	// Limits are the request limits (body, prompt, num_predict), checked
	// with the worker's own decoder before anything is published.
	MaxBodyBytes   int
	MaxPromptBytes int
	MaxNumPredict  int
	// Tracer starts the producer span whose context goes into the
	// message's traceparent; nil passes the client's traceparent on as is.
	Tracer trace.Tracer
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Server serves the OpenAI-compatible API. Create it with New; it is an
// http.Handler.
type Server struct {
	cfg    Config
	broker Broker
	log    *slog.Logger
	mux    *http.ServeMux
	open   chan struct{}
	prop   propagation.TextMapPropagator
}

// New returns a server that sends requests through b.
func New(cfg Config, b Broker, log *slog.Logger) *Server {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Minute
	}
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = 15 * time.Second
	}
	if cfg.RetryAfter <= 0 {
		cfg.RetryAfter = 5 * time.Second
	}
	if cfg.MaxOpen <= 0 {
		cfg.MaxOpen = 1024
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = 1 << 20
	}
	if len(cfg.Models) == 0 && cfg.Model != "" {
		cfg.Models = []string{cfg.Model}
	}
	if cfg.Tracer == nil {
		cfg.Tracer = noop.NewTracerProvider().Tracer("")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Server{cfg: cfg, broker: b, log: log, mux: http.NewServeMux(), open: make(chan struct{}, cfg.MaxOpen), prop: propagation.TraceContext{}}
	s.mux.HandleFunc("POST /v1/chat/completions", s.auth(func(w http.ResponseWriter, r *http.Request, k *Key) { s.serve(w, r, k, epChat) }))
	s.mux.HandleFunc("POST /v1/completions", s.auth(func(w http.ResponseWriter, r *http.Request, k *Key) { s.serve(w, r, k, epCompletion) }))
	s.mux.HandleFunc("POST /v1/embeddings", s.auth(func(w http.ResponseWriter, r *http.Request, k *Key) { s.serve(w, r, k, epEmbedding) }))
	s.mux.HandleFunc("GET /v1/models", s.auth(s.models))
	s.mux.HandleFunc("GET /v1/models/{model...}", s.auth(s.model))
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &apiError{Status: 404, Type: "invalid_request_error", Code: "unknown_url",
			Message: "unknown URL " + r.Method + " " + truncate(r.URL.Path, 100) + "; this gateway serves /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models"})
	})
	return s
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// auth checks the bearer key (when keys are configured) and its rate.
func (s *Server) auth(next func(http.ResponseWriter, *http.Request, *Key)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var k *Key
		if s.cfg.Keys != nil {
			token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if ok {
				k = s.cfg.Keys.Lookup(strings.TrimSpace(token))
			}
			if k == nil {
				writeError(w, errUnauthorized())
				return
			}
			if k.bucket != nil {
				if ok, wait := k.bucket.take(s.cfg.Now()); !ok {
					writeError(w, errRateLimited(wait))
					return
				}
			}
		}
		next(w, r, k)
	}
}

func (s *Server) allowed(k *Key) []string {
	if k == nil {
		return s.cfg.Models
	}
	return slices.DeleteFunc(slices.Clone(s.cfg.Models), func(m string) bool { return !k.Allows(m) })
}

func (s *Server) models(w http.ResponseWriter, _ *http.Request, k *Key) {
	list := modelList{Object: "list", Data: []model{}}
	for _, m := range s.allowed(k) {
		list.Data = append(list.Data, model{ID: m, Object: "model", OwnedBy: "sous"})
	}
	writeJSON(w, http.StatusOK, list)
}

func (s *Server) model(w http.ResponseWriter, r *http.Request, k *Key) {
	m := r.PathValue("model")
	if !slices.Contains(s.allowed(k), m) {
		writeError(w, errModelNotFound(m))
		return
	}
	writeJSON(w, http.StatusOK, model{ID: m, Object: "model", OwnedBy: "sous"})
}

// serve runs one completion, chat or embedding request end to end.
func (s *Server) serve(w http.ResponseWriter, r *http.Request, k *Key, ep endpoint) {
	select {
	case s.open <- struct{}{}:
		defer func() { <-s.open }()
	default:
		writeError(w, errTooManyOpen(time.Second))
		return
	}
	body, aerr := s.readBody(w, r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	var t *translated
	switch ep {
	case epChat:
		t, aerr = translateChat(body)
	case epCompletion:
		t, aerr = translateCompletion(body)
	default:
		t, aerr = translateEmbedding(body)
	}
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	if t.req.Model == "" {
		t.req.Model = s.cfg.Model
	}
	if !slices.Contains(s.allowed(k), t.req.Model) {
		writeError(w, errModelNotFound(t.req.Model))
		return
	}
	now := s.cfg.Now()
	id := newID()
	deadline := now.Add(s.cfg.Timeout)
	t.req.ID = id
	t.req.Deadline = &deadline
	msg, _ := json.Marshal(t.req)
	// The worker's own decoder and limits: what it would dead-letter is a
	// 400 here, before anything is published.
	if _, err := wire.DecodeRequest(msg, "application/json", id, wire.Limits{
		MaxBodyBytes: s.cfg.MaxBodyBytes, MaxPromptBytes: s.cfg.MaxPromptBytes, MaxNumPredict: s.cfg.MaxNumPredict,
		DefaultModel: s.cfg.Model, AllowedModels: s.cfg.Models,
	}, now); err != nil {
		var ie *wire.InputError
		if errors.As(err, &ie) {
			writeError(w, fromInputError(ie, t.req.Model))
			return
		}
		writeError(w, badRequest("", "invalid request"))
		return
	}

	ctx, cancel := context.WithDeadline(r.Context(), deadline)
	defer cancel()
	ctx = s.prop.Extract(ctx, propagation.HeaderCarrier(r.Header))
	ctx, span := s.cfg.Tracer.Start(ctx, "publish "+s.cfg.Queue, trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(
			attribute.String("messaging.system", "rabbitmq"),
			attribute.String("messaging.operation.type", "send"),
			attribute.String("messaging.destination.name", s.cfg.Queue),
			attribute.String("messaging.message.id", id),
			attribute.String("gen_ai.request.model", t.req.Model),
		))
	defer span.End()
	headers := map[string]string{}
	s.prop.Inject(ctx, propagation.MapCarrier(headers))

	log := s.log.With("request_id", id, "model", t.req.Model)
	if k != nil {
		log = log.With("key", k.Name)
	}
	c, err := s.broker.Send(ctx, Message{ID: id, Body: msg, Headers: headers})
	if err != nil {
		aerr := s.sendError(err)
		if aerr == nil { // the client went away
			return
		}
		span.SetStatus(codes.Error, aerr.Code)
		log.Warn("request not published", "status", aerr.Status, "err", err)
		writeError(w, aerr)
		return
	}
	defer c.Close()
	log.Debug("request published")
	ans := answer{s: s, t: t, id: "chatcmpl-" + id, created: now.Unix(), model: t.req.Model, log: log, span: span}
	if ep == epCompletion {
		ans.id = "cmpl-" + id
	}
	if t.req.Stream {
		ans.stream(ctx, w, c)
	} else {
		ans.wait(ctx, w, c)
	}
}

func (s *Server) readBody(w http.ResponseWriter, r *http.Request) ([]byte, *apiError) {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(strings.ToLower(ct), "application/json") {
		return nil, &apiError{Status: 415, Type: "invalid_request_error", Code: "unsupported_content_type", Message: "send the body as application/json"}
	}
	// A slow sender may hold a connection only so long.
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(s.cfg.Now().Add(30 * time.Second))
	defer func() { _ = rc.SetReadDeadline(time.Time{}) }()
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, int64(s.cfg.MaxBodyBytes)))
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		return nil, errBodyTooLarge(s.cfg.MaxBodyBytes)
	case err != nil:
		return nil, badRequest("", "cannot read the body: %v", err)
	}
	return body, nil
}

// sendError maps a failed Send; nil means the client went away.
func (s *Server) sendError(err error) *apiError {
	switch {
	case errors.Is(err, ErrQueueFull):
		return errQueueFull(s.cfg.RetryAfter)
	case errors.Is(err, ErrNoQueue):
		return errUnavailable("the request queue does not exist yet: start a worker (it declares the queue) or check SOUS_QUEUE")
	case errors.Is(err, context.DeadlineExceeded):
		return errTimeout(s.cfg.Timeout)
	case errors.Is(err, context.Canceled):
		return nil
	}
	return errUnavailable("the message broker is unavailable; retry shortly")
}
