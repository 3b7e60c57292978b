package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

// answer turns the replies of one call into the HTTP response. It holds
// only what the response needs: never the request (its prompt may be
// hundreds of KiB, kept for as long as the request is open).
type answer struct {
	s            *Server
	ep           endpoint
	includeUsage bool
	base64       bool
	echo         *responsesEcho // the Responses API: what a Response repeats
	forcedTool   bool           // tool_choice "required" or a named function
	reqID        string         // the sous request id, for errors and logs
	id           string
	created      int64
	model        string
	log          *slog.Logger
	span         trace.Span
}

// next waits for replies, calling tick every interval while none come.
// It returns the replies, or an error: ctx's, or the call's.
func next(ctx context.Context, c Call, interval time.Duration, tick func() error) ([]Reply, error) {
	var t *time.Ticker
	var tc <-chan time.Time
	if tick != nil {
		t = time.NewTicker(interval)
		defer t.Stop()
		tc = t.C
	}
	for {
		if rs, err := c.Take(); len(rs) > 0 || err != nil {
			return rs, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-c.Notify():
		case <-tc:
			if err := tick(); err != nil {
				return nil, err
			}
		}
	}
}

// failure maps a wait that ended without a result; nil when the client
// went away.
func (a *answer) failure(err error) *apiError {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return errTimeout(a.s.cfg.Timeout)
	case errors.Is(err, context.Canceled):
		a.log.Info("client went away; a late result will be dropped")
		return nil
	}
	return errUnavailable("the connection to the message broker was lost while waiting for the answer; retry")
}

func (a *answer) decodeResult(body []byte) (*wire.Result, *apiError) {
	var r wire.Result
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, &apiError{Status: 502, Type: "server_error", Code: "bad_result", Message: "the worker's result is not JSON"}
	}
	if r.Status != wire.StatusOK {
		e := r.Error
		if e == nil {
			e = &wire.ErrorInfo{Code: "unknown", Message: "the worker reported an error without details"}
		}
		a.log.Warn("the worker reported an error", "code", e.Code, "detail", e.Message)
		a.span.AddEvent("worker error", trace.WithAttributes(attribute.String("error.type", e.Code), attribute.String("sous.error.detail", e.Message)))
		ae := fromResult(e, a.model, a.reqID)
		if a.forcedTool && e.Code == "engine_rejected" {
			// The likeliest cause, and one the client can act on.
			ae.Param = "tool_choice"
			ae.Message += `; a tool_choice of "required" or a named function is refused by engines that cannot force a call (Ollama): send "auto"`
		}
		return nil, ae
	}
	return &r, nil
}

func (a *answer) fail(e *apiError) {
	a.span.SetStatus(codes.Error, e.Code)
	a.log.Warn("request failed", "status", e.Status, "code", e.Code)
}

// wait answers a non-streamed request with one JSON body.
func (a *answer) wait(ctx context.Context, w http.ResponseWriter, c Call) *apiError {
	for {
		rs, err := next(ctx, c, 0, nil)
		if err != nil {
			e := a.failure(err)
			if e != nil {
				a.fail(e)
				writeError(w, e)
			}
			return e
		}
		for _, rep := range rs {
			if rep.Chunk {
				continue
			}
			r, e := a.decodeResult(rep.Body)
			if e != nil {
				a.fail(e)
				writeError(w, e)
				return e
			}
			writeJSON(w, http.StatusOK, a.body(r))
			return nil
		}
	}
}

func (a *answer) body(r *wire.Result) any {
	u := usageOf(r)
	switch a.ep {
	case epChat:
		text := resultText(r)
		m := assistantMsg{Role: "assistant", Content: &text, ToolCalls: answerCalls(resultCalls(r))}
		if text == "" && len(m.ToolCalls) > 0 {
			m.Content = nil
		}
		return chatCompletion{ID: a.id, Object: "chat.completion", Created: a.created, Model: a.model,
			Choices: []chatChoice{{Index: 0, Message: m, FinishReason: finishReason(r.DoneReason)}},
			Usage:   u}
	case epResponses:
		return a.response(r, a.responseOutput(r))
	case epCompletion:
		fr := finishReason(r.DoneReason)
		return textCompletion{ID: a.id, Object: "text_completion", Created: a.created, Model: a.model,
			Choices: []textChoice{{Text: resultText(r), Index: 0, FinishReason: &fr}}, Usage: &u}
	}
	list := embeddingList{Object: "list", Model: a.model, Data: make([]embedding, 0, len(r.Embeddings)),
		Usage: embedUsage{PromptTokens: u.PromptTokens, TotalTokens: u.PromptTokens}}
	for i, v := range r.Embeddings {
		var e any = v
		if a.base64 {
			e = base64Floats(v)
		}
		list.Data = append(list.Data, embedding{Object: "embedding", Embedding: e, Index: i})
	}
	return list
}

// sse writes server-sent events and flushes each.
type sse struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func (s sse) event(v any) error {
	b, _ := json.Marshal(v)
	if _, err := fmt.Fprintf(s.w, "data: %s\n\n", b); err != nil {
		return err
	}
	return s.rc.Flush()
}

// named writes an event with its type as the SSE event name, as the
// Responses API streams.
func (s sse) named(typ string, v any) error {
	b, _ := json.Marshal(v)
	if _, err := fmt.Fprintf(s.w, "event: %s\ndata: %s\n\n", typ, b); err != nil {
		return err
	}
	return s.rc.Flush()
}

func (s sse) raw(line string) error {
	if _, err := fmt.Fprint(s.w, line); err != nil {
		return err
	}
	return s.rc.Flush()
}

// stream answers a streamed request with server-sent events: the
// request is already confirmed by the broker, so the 200 goes out at once
// and comments keep the connection alive until the first chunk. Errors
// after that are an SSE event {"error": {...}}, which OpenAI's clients
// raise as an APIError.
func (a *answer) stream(ctx context.Context, w http.ResponseWriter, c Call) *apiError {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	h.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	w.WriteHeader(http.StatusOK)
	out := sse{w: w, rc: http.NewResponseController(w)}
	if err := out.raw(": queued\n\n"); err != nil {
		return nil // the client went away
	}
	var sw streamWriter = chatStream{a: a, out: out}
	if a.ep == epResponses {
		sw = &responsesStream{a: a, out: out, msg: -1}
	}
	if err := sw.start(); err != nil {
		return nil
	}
	// sent and calls are what the client has seen, for a stream that
	// restarts on another worker: see docs/messages.md, Streaming.
	var sent strings.Builder
	var calls []string // ids of the tool calls sent
	shown := func() bool { return sent.Len() > 0 || len(calls) > 0 }
	started, restarted := false, false
	keepAlive := func() error { return out.raw(": waiting\n\n") }
	for {
		rs, err := next(ctx, c, a.s.cfg.KeepAlive, keepAlive)
		if err != nil {
			e := a.failure(err)
			if e != nil {
				a.fail(e)
				sw.fail(e)
			}
			return e
		}
		for _, rep := range rs {
			if rep.Chunk {
				var ch wire.Chunk
				if json.Unmarshal(rep.Body, &ch) != nil {
					continue
				}
				if (ch.Restart || (ch.Seq == 0 && started)) && shown() {
					// What was shown so far cannot be taken back: wait for
					// the final result and send what follows it, if it
					// continues what was shown.
					restarted = true
					a.log.Info("stream restarted on another attempt; waiting for the final result", "attempt", ch.Attempt)
				}
				started = true
				if restarted {
					continue
				}
				if ch.Delta != "" {
					if err := sw.text(ch.Delta, !shown()); err != nil {
						return nil // the client went away
					}
					sent.WriteString(ch.Delta)
				}
				if len(ch.ToolCalls) > 0 {
					if err := sw.calls(ch.ToolCalls, len(calls), !shown()); err != nil {
						return nil
					}
					for _, tc := range ch.ToolCalls {
						calls = append(calls, tc.ID)
					}
				}
				continue
			}
			r, e := a.decodeResult(rep.Body)
			if e != nil {
				a.fail(e)
				sw.fail(e)
				return e
			}
			rest := resultText(r)
			all := resultCalls(r)
			if !strings.HasPrefix(rest, sent.String()) || !sameCalls(calls, all) {
				e := &apiError{Status: 502, Type: "server_error", Code: "stream_restarted",
					Message: "the worker streaming this answer failed and another attempt produced a different answer; retry the request"}
				a.fail(e)
				sw.fail(e)
				return e
			}
			if rest = rest[sent.Len():]; rest != "" || !shown() && len(all) == 0 {
				// An empty answer still has its role delta, as OpenAI sends.
				if err := sw.text(rest, !shown()); err != nil {
					return nil
				}
				sent.WriteString(rest)
			}
			if len(all) > len(calls) {
				if err := sw.calls(all[len(calls):], len(calls), !shown()); err != nil {
					return nil
				}
			}
			_ = sw.finish(r)
			return nil
		}
	}
}

// streamWriter writes one API's stream events.
type streamWriter interface {
	// start writes what comes before the answer.
	start() error
	// text writes a text delta; first: nothing was shown before it.
	text(delta string, first bool) error
	// calls writes whole tool calls, from the index of the first.
	calls(calls []inference.ToolCall, from int, first bool) error
	// finish writes the end of the stream.
	finish(r *wire.Result) error
	// fail writes an error event.
	fail(e *apiError)
}

// chatStream is the stream of chat and text completions.
type chatStream struct {
	a   *answer
	out sse
}

func (c chatStream) start() error { return nil }
func (c chatStream) text(d string, first bool) error {
	return c.a.delta(c.out, d, first)
}
func (c chatStream) calls(calls []inference.ToolCall, from int, first bool) error {
	return c.a.toolDeltas(c.out, calls, from, first)
}
func (c chatStream) finish(r *wire.Result) error { return c.a.finish(c.out, r) }
func (c chatStream) fail(e *apiError)            { _ = c.out.event(e.body()) }

// sameCalls says whether the calls streamed so far (their ids) begin the
// final answer's calls.
func sameCalls(sent []string, all []inference.ToolCall) bool {
	if len(sent) > len(all) {
		return false
	}
	for i, id := range sent {
		if all[i].ID != id {
			return false
		}
	}
	return true
}

// toolDeltas streams calls as OpenAI does: for each, one delta with its
// index, id, type and name (arguments ""), then one with the arguments.
// from is the index of the first.
func (a *answer) toolDeltas(out sse, calls []inference.ToolCall, from int, first bool) error {
	for i, c := range answerCalls(calls) {
		idx := from + i
		head := c
		head.Index = &idx
		empty := ""
		head.Function.Arguments = &empty
		d := delta{ToolCalls: []outToolCall{head}}
		if first && i == 0 {
			d.Role = "assistant"
		}
		if err := out.event(a.chunk([]chatChunkChoice{{Index: 0, Delta: d}})); err != nil {
			return err
		}
		var args outToolCall
		args.Index = &idx
		args.Function.Arguments = c.Function.Arguments
		if err := out.event(a.chunk([]chatChunkChoice{{Index: 0, Delta: delta{ToolCalls: []outToolCall{args}}}})); err != nil {
			return err
		}
	}
	return nil
}

func (a *answer) delta(out sse, text string, first bool) error {
	if a.ep == epCompletion {
		return out.event(textCompletion{ID: a.id, Object: "text_completion", Created: a.created, Model: a.model,
			Choices: []textChoice{{Text: text, Index: 0}}})
	}
	d := delta{Content: &text}
	if first {
		d.Role = "assistant"
	}
	return out.event(a.chunk([]chatChunkChoice{{Index: 0, Delta: d}}))
}

func (a *answer) chunk(choices []chatChunkChoice) chatChunk {
	c := chatChunk{ID: a.id, Object: "chat.completion.chunk", Created: a.created, Model: a.model, Choices: choices}
	if a.includeUsage {
		c.Usage = (*usage)(nil) // "usage": null on every chunk but the last
	}
	return c
}

func (a *answer) finish(out sse, r *wire.Result) error {
	fr := finishReason(r.DoneReason)
	u := usageOf(r)
	if a.ep == epCompletion {
		if err := out.event(textCompletion{ID: a.id, Object: "text_completion", Created: a.created, Model: a.model,
			Choices: []textChoice{{Text: "", Index: 0, FinishReason: &fr}}}); err != nil {
			return err
		}
		if a.includeUsage {
			if err := out.event(textCompletion{ID: a.id, Object: "text_completion", Created: a.created, Model: a.model,
				Choices: []textChoice{}, Usage: &u}); err != nil {
				return err
			}
		}
	} else {
		if err := out.event(a.chunk([]chatChunkChoice{{Index: 0, Delta: delta{}, FinishReason: &fr}})); err != nil {
			return err
		}
		if a.includeUsage {
			last := a.chunk([]chatChunkChoice{})
			last.Usage = &u
			if err := out.event(last); err != nil {
				return err
			}
		}
	}
	return out.raw("data: [DONE]\n\n")
}
