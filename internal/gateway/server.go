package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/wire"
)

// Config configures a Server. cmd/gateway fills it from the environment.
type Config struct {
	// Queue is the request queue when there are no Lanes.
	Queue string
	// Lanes are the lanes requests may go to, highest rank first
	// (SOUS_GATEWAY_LANES; their shares are not used here): each request
	// goes to the queue of the lane its X-Sous-Lane header names, else of
	// its key's default lane, else of the first. Empty: every request goes
	// to Queue, and an X-Sous-Lane header is a 400.
	Lanes []lanes.Lane
	// System is the broker, as OpenTelemetry's messaging.system names it:
	// rabbitmq (default) or servicebus.
	System string
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
	// BodyTimeout bounds the reading of a request body (408 after it;
	// default 30s).
	BodyTimeout time.Duration
	// WriteTimeout bounds each write and flush of a response, so that a
	// client that stops reading frees its slot (default 30s).
	WriteTimeout time.Duration
	// MaxIntake bounds the requests whose bodies are being read, decoded
	// and published at once: each holds its body several times over
	// until it is published (default 32).
	MaxIntake int
	// Limits are the request limits (body, prompt, num_predict), checked
	// with the worker's own decoder before anything is published.
	MaxBodyBytes   int
	MaxPromptBytes int
	MaxNumPredict  int
	// Tracer starts the producer span whose context goes into the
	// message's traceparent; nil passes the client's traceparent on as is.
	Tracer trace.Tracer
	// Meter makes the gateway's metrics; nil makes none.
	Meter metric.Meter
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Batch turns on the Batch API (/v1/files, /v1/batches); nil: off.
	// RunBatches does its background work.
	Batch *BatchConfig
}

// Server serves the OpenAI-compatible API. Create it with New; it is an
// http.Handler.
type Server struct {
	cfg    Config
	broker Broker
	log    *slog.Logger
	mux    *http.ServeMux
	open   chan struct{}
	intake chan struct{}
	prop   propagation.TextMapPropagator
	m      metrics
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
	if cfg.MaxIntake <= 0 {
		cfg.MaxIntake = 32
	}
	if cfg.BodyTimeout <= 0 {
		cfg.BodyTimeout = 30 * time.Second
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 30 * time.Second
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
	if cfg.System == "" {
		cfg.System = "rabbitmq"
	}
	s := &Server{cfg: cfg, broker: b, log: log, mux: http.NewServeMux(), open: make(chan struct{}, cfg.MaxOpen), intake: make(chan struct{}, cfg.MaxIntake), prop: propagation.TraceContext{}, m: newMetrics(cfg.Meter)}
	s.handle("POST /v1/chat/completions", func(w http.ResponseWriter, r *http.Request, k *Key) *apiError { return s.serve(w, r, k, epChat) })
	s.handle("POST /v1/completions", func(w http.ResponseWriter, r *http.Request, k *Key) *apiError { return s.serve(w, r, k, epCompletion) })
	s.handle("POST /v1/embeddings", func(w http.ResponseWriter, r *http.Request, k *Key) *apiError { return s.serve(w, r, k, epEmbedding) })
	s.handle("POST /v1/responses", func(w http.ResponseWriter, r *http.Request, k *Key) *apiError { return s.serve(w, r, k, epResponses) })
	s.handle("GET /v1/models", s.models)
	s.handle("GET /v1/models/{model...}", s.model)
	served := "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses (stateless: nothing is stored to GET later) and /v1/models"
	if cfg.Batch != nil {
		cfg.Batch.defaults()
		s.routeBatches()
		served = "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses (stateless: nothing is stored to GET later), /v1/models, and the Batch API's /v1/files and /v1/batches"
	} else {
		served += "; its Batch API (/v1/files, /v1/batches) is off"
	}
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &apiError{Status: 404, Type: "invalid_request_error", Code: "unknown_url",
			Message: "unknown URL " + r.Method + " " + truncate(r.URL.Path, 100) + "; this gateway serves " + served})
	})
	return s
}

// handler serves one route for an authenticated key (nil without keys).
// It returns the error it answered with, nil on success, for the metrics
// (a stream's error after its 200 included).
type handler func(http.ResponseWriter, *http.Request, *Key) *apiError

// handle registers h behind the key check and the metrics.
func (s *Server) handle(pattern string, h handler) {
	route := pattern[strings.IndexByte(pattern, ' ')+1:]
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		start := s.cfg.Now()
		rec := &statusRecorder{ResponseWriter: w}
		e := s.auth(rec, r, h)
		o := outcome{status: rec.status, lane: rec.lane}
		if e != nil {
			o = outcome{status: e.Status, code: e.Code, lane: rec.lane}
		}
		if e == nil && (rec.status == 0 || r.Context().Err() != nil) {
			// The client went away: before any answer, or mid-stream.
			o = outcome{status: 499, code: "client_closed", lane: rec.lane}
		}
		s.m.record(route, start, o)
	})
}

// auth checks the bearer key (when keys are configured) and its rate.
func (s *Server) auth(w http.ResponseWriter, r *http.Request, next handler) *apiError {
	var k *Key
	if s.cfg.Keys != nil {
		// The scheme is case-insensitive (RFC 9110, 11.1): "bearer" too.
		scheme, token, ok := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " ")
		if ok && strings.EqualFold(scheme, "Bearer") {
			k = s.cfg.Keys.Lookup(strings.TrimSpace(token))
		}
		if k == nil {
			return fail(w, errUnauthorized())
		}
		if k.bucket != nil {
			if ok, wait := k.bucket.take(s.cfg.Now()); !ok {
				return fail(w, errRateLimited(wait))
			}
		}
	}
	return next(w, r, k)
}

// fail answers e and returns it.
func fail(w http.ResponseWriter, e *apiError) *apiError {
	writeError(w, e)
	return e
}

func (s *Server) allowed(k *Key) []string {
	if k == nil {
		return s.cfg.Models
	}
	return slices.DeleteFunc(slices.Clone(s.cfg.Models), func(m string) bool { return !k.Allows(m) })
}

func (s *Server) models(w http.ResponseWriter, _ *http.Request, k *Key) *apiError {
	list := modelList{Object: "list", Data: []model{}}
	for _, m := range s.allowed(k) {
		list.Data = append(list.Data, model{ID: m, Object: "model", OwnedBy: "sous"})
	}
	writeJSON(w, http.StatusOK, list)
	return nil
}

func (s *Server) model(w http.ResponseWriter, r *http.Request, k *Key) *apiError {
	m := r.PathValue("model")
	if !slices.Contains(s.allowed(k), m) {
		return fail(w, errModelNotFound(m))
	}
	writeJSON(w, http.StatusOK, model{ID: m, Object: "model", OwnedBy: "sous"})
	return nil
}

// serve runs one completion, chat or embedding request end to end.
func (s *Server) serve(w http.ResponseWriter, r *http.Request, k *Key, ep endpoint) *apiError {
	select {
	case s.open <- struct{}{}:
		defer func() { <-s.open }()
	default:
		return fail(w, errTooManyOpen(time.Second))
	}
	s.m.open.Add(context.Background(), 1)
	defer s.m.open.Add(context.Background(), -1)
	// The intake runs in its own frames, gone while the request waits:
	// the waiting goroutine's stack stays small.
	p, aerr := s.publish(w, r, k, ep)
	if p == nil {
		return aerr
	}
	defer p.cancel()
	defer p.ans.span.End()
	defer p.call.Close()
	if p.stream {
		return p.ans.stream(p.ctx, w, p.call)
	}
	return p.ans.wait(p.ctx, w, p.call)
}

// pending is a published request: what its answer needs, nothing more.
type pending struct {
	ctx    context.Context
	cancel context.CancelFunc
	call   Call
	ans    *answer
	stream bool
}

// publish reads, checks and publishes a request. It returns nil, with the
// error it answered (nil if the client went away), when it did not.
func (s *Server) publish(w http.ResponseWriter, r *http.Request, k *Key, ep endpoint) (*pending, *apiError) {
	// The lane needs only the headers: a refusal reads no body.
	lane, aerr := s.lane(r, k)
	if aerr != nil {
		return nil, fail(w, aerr)
	}
	setLane(w, lane.Name)
	// Until it is published a request holds its body several times over
	// (read, translated, encoded, checked): only MaxIntake at once. The
	// wait is bounded like the body's.
	wait := time.NewTimer(s.cfg.BodyTimeout)
	select {
	case s.intake <- struct{}{}:
		wait.Stop()
	case <-wait.C:
		return nil, fail(w, errIntakeFull(time.Second))
	case <-r.Context().Done():
		wait.Stop()
		return nil, nil
	}
	inIntake := true
	leaveIntake := func() {
		if inIntake {
			inIntake = false
			<-s.intake
		}
	}
	defer leaveIntake()
	body, aerr := s.readBody(w, r)
	if aerr != nil {
		return nil, fail(w, aerr)
	}
	var t *translated
	switch ep {
	case epChat:
		t, aerr = translateChat(body)
	case epCompletion:
		t, aerr = translateCompletion(body)
	case epResponses:
		t, aerr = translateResponses(body)
	default:
		t, aerr = translateEmbedding(body)
	}
	if aerr != nil {
		return nil, fail(w, aerr)
	}
	if t.req.Model == "" {
		t.req.Model = s.cfg.Model
	}
	if !slices.Contains(s.allowed(k), t.req.Model) {
		return nil, fail(w, errModelNotFound(t.req.Model))
	}
	now := s.cfg.Now()
	id := newID()
	w.Header().Set("X-Request-Id", id)
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
			return nil, fail(w, fromInputError(ie, t.req.Model))
		}
		return nil, fail(w, badRequest("", "invalid request"))
	}

	ctx, cancel := context.WithDeadline(r.Context(), deadline)
	ctx = s.prop.Extract(ctx, propagation.HeaderCarrier(r.Header))
	attrs := []attribute.KeyValue{
		attribute.String("messaging.system", s.cfg.System),
		attribute.String("messaging.operation.type", "send"),
		attribute.String("messaging.destination.name", lane.Queue),
		attribute.String("messaging.message.id", id),
		attribute.String("gen_ai.request.model", t.req.Model),
	}
	if lane.Name != "" {
		attrs = append(attrs, attribute.String("sous.lane", lane.Name))
	}
	ctx, span := s.cfg.Tracer.Start(ctx, "publish "+lane.Queue, trace.WithSpanKind(trace.SpanKindProducer), trace.WithAttributes(attrs...))
	headers := map[string]string{}
	s.prop.Inject(ctx, propagation.MapCarrier(headers))
	// What the answer needs; t, body and msg are not used past Send, so
	// the prompt is not kept while the request waits.
	stream := t.req.Stream
	forced := len(t.req.ToolChoice) > 0 && string(t.req.ToolChoice) != `"auto"` && string(t.req.ToolChoice) != `"none"`
	ans := &answer{s: s, ep: ep, includeUsage: t.includeUsage, base64: t.base64, echo: t.echo, forcedTool: forced, reqID: id,
		id: "chatcmpl-" + id, created: now.Unix(), model: t.req.Model, span: span}

	log := s.log.With("request_id", id, "model", ans.model)
	if lane.Name != "" {
		log = log.With("lane", lane.Name)
	}
	if k != nil {
		log = log.With("key", k.Name)
	}
	ans.log = log
	c, err := s.broker.Send(ctx, Message{ID: id, Queue: lane.Queue, Body: msg, Headers: headers})
	leaveIntake()
	if err != nil {
		defer cancel()
		defer span.End()
		aerr := s.sendError(err)
		if aerr == nil { // the client went away
			return nil, nil
		}
		span.SetStatus(codes.Error, aerr.Code)
		log.Warn("request not published", "status", aerr.Status, "err", err)
		return nil, fail(w, aerr)
	}
	log.Debug("request published")
	switch ep {
	case epCompletion:
		ans.id = "cmpl-" + id
	case epResponses:
		ans.id = "resp_" + id
	}
	return &pending{ctx: ctx, cancel: cancel, call: c, ans: ans, stream: stream}, nil
}

func (s *Server) readBody(w http.ResponseWriter, r *http.Request) ([]byte, *apiError) {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(strings.ToLower(ct), "application/json") {
		return nil, &apiError{Status: 415, Type: "invalid_request_error", Code: "unsupported_content_type", Message: "send the body as application/json"}
	}
	// A slow sender may hold a connection only so long. The deadline
	// stays on failure: ServeHTTP then closes the connection.
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(s.cfg.BodyTimeout))
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, int64(s.cfg.MaxBodyBytes)))
	var mbe *http.MaxBytesError
	var ne net.Error
	switch {
	case errors.As(err, &mbe):
		return nil, errBodyTooLarge(s.cfg.MaxBodyBytes)
	case errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		return nil, errBodyTimeout(s.cfg.BodyTimeout)
	case err != nil:
		// The error names the socket's addresses: not for the client.
		return nil, badRequest("", "cannot read the body: the connection failed or the body is malformed")
	}
	// Read to its end: the wait for the answer that follows is bounded by
	// the request's deadline, and net/http's background read must not
	// cancel it.
	_ = rc.SetReadDeadline(time.Time{})
	return body, nil
}

// sendError maps a failed Send; nil means the client went away.
func (s *Server) sendError(err error) *apiError {
	switch {
	case errors.Is(err, ErrQueueFull):
		return errQueueFull(s.cfg.RetryAfter)
	case errors.Is(err, ErrBlocked):
		e := errUnavailable("the message broker refuses new requests for now (a memory or disk alarm); retry after the Retry-After header's seconds")
		e.RetryAfter = s.cfg.RetryAfter
		return e
	case errors.Is(err, ErrNoQueue):
		return errUnavailable("the request queue does not exist: the gateway and the worker declare it when they start with SOUS_DECLARE=true (the default); with SOUS_DECLARE=false declare it yourself, or check SOUS_QUEUE (with lanes, SOUS_GATEWAY_LANES)")
	case errors.Is(err, context.DeadlineExceeded):
		return errTimeout(s.cfg.Timeout)
	case errors.Is(err, context.Canceled):
		return nil
	}
	return errUnavailable("the message broker is unavailable; retry shortly")
}
