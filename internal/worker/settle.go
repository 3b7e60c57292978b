package worker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/wire"
)

// settleTimeout bounds a settle: publishing its result, then the broker's
// settlement. A settle's bound ends up to boundStep(settleTimeout) later
// (deadline.Source).
const settleTimeout = 30 * time.Second

// boundStep is how long the worker hands out one shared bound of d: a
// settle or an engine call may run this much longer than its bound, a
// tenth of it at most and never more than a second.
func boundStep(d time.Duration) time.Duration { return min(time.Second, d/10) }

// settle is the one place that decides ack, requeue or dead-letter for a
// delivery, publishes its result first where there is one, and recovers
// panics. It is called exactly once per delivery.
func (w *Worker) settle(it *item, out outcome) {
	if it.ctx == nil {
		it.ctx = context.Background()
	}
	ctx, cancel := w.settleBound.Bound(context.WithoutCancel(it.ctx))
	defer cancel()
	var s queue.Settlement // what the broker last took: reported to the observer
	settled := false       // set once the broker took a settlement
	defer func() {
		o := Outcome{Settlement: s, Err: out.err, Usage: out.resp.Usage}
		if it.key != "" { // decoded: kind and model are validated
			o.Kind, o.Model = it.dec.Req.Kind, it.dec.Req.Model
		}
		o.Lane = it.lane.Name
		if end := it.dispatched; !it.d.ReceivedAt.IsZero() {
			if end.IsZero() {
				end = w.now()
			}
			o.Wait = max(0, end.Sub(it.d.ReceivedAt))
		}
		w.obs.Done(it.ctx, it.d, o)
		w.inflight.Add(-1)
		it.lane.inflight.Add(-1)
		w.freeAll()
	}()
	defer func() {
		if p := recover(); p != nil {
			w.log.ErrorContext(ctx, "panic while settling", "id", it.d.ID, "settled", settled, "panic", p, "stack", string(debug.Stack()))
			if !settled { // settling twice would break the broker channel
				s = w.apply(ctx, it, queue.Settlement{Action: queue.Requeue, Reason: "internal_error"}, &settled)
			}
		}
	}()
	s = w.apply(ctx, it, w.decide(ctx, it, out), &settled)
}

func (w *Worker) decide(ctx context.Context, it *item, out outcome) queue.Settlement {
	d := it.d
	if out.requeue != "" {
		reason := out.requeue
		if !queue.Counts(reason) && it.streamed.Load() {
			// Chunks of it went out: its next delivery streams it again,
			// and a client learns to drop what it has from the first
			// chunk's restart marker, which a delivery carries from its
			// second attempt on (wire.Chunk.Restart). So this hand-back
			// spends an attempt after all.
			reason = "stream_restart"
		}
		return queue.Settlement{Action: queue.Requeue, Reason: reason}
	}
	if reason := it.d.Headers[headerAnswered]; reason != "" {
		// Answered, then its dead-letter failed: dead-letter it now, with
		// neither an engine call nor a second result.
		return queue.Settlement{Action: queue.DeadLetter, Reason: reason, Description: "its error result was published on an earlier delivery, when dead-lettering it failed"}
	}
	if out.err != nil && errors.Is(out.err, context.Canceled) {
		// Cut off by the drain deadline: the engine did not fail, so this
		// is no attempt's end and no reason to give up on the request.
		return queue.Settlement{Action: queue.Requeue, Reason: queue.ReasonShutdown}
	}
	id := d.CorrelationKey()
	model := ""
	if it.dec != nil {
		id, model = it.dec.ID, it.dec.Req.Model
	}
	if st, ok := it.lane.Broker.(staler); ok && st.Stale(d) {
		// The broker already took the delivery back (a lost lock): it will
		// be redelivered and answered then, so don't answer it twice.
		w.log.WarnContext(ctx, "delivery lost its lock before it was answered; not publishing", "id", id)
		return queue.Settlement{Action: queue.Requeue, Reason: "lock_lost"}
	}
	if out.err == nil {
		res := wire.OKResult(id, it.dec.Req, out.resp)
		if it.dec.Stream {
			done := true
			res.Done = &done
		}
		err := w.publishResult(ctx, it, res, out)
		switch {
		case err == nil:
			return queue.Settlement{Action: queue.Ack}
		case errors.Is(err, queue.ErrUnroutable) && d.ReplyTo != "":
			// The producer's reply queue is gone: nobody waits for this
			// answer any more. Retrying would not bring the queue back.
			w.log.WarnContext(ctx, "the request's reply_to queue does not exist; dropping its result", "id", id, "reply_to", d.ReplyTo)
			return queue.Settlement{Action: queue.Ack}
		case d.Attempt >= w.cfg.MaxAttempts:
			// Keep the request, with the reason, rather than loop on it.
			return queue.Settlement{Action: queue.DeadLetter, Reason: "publish_failed", Description: fmt.Sprintf("the result could not be published after %d attempts: %v", d.Attempt, err)}
		default:
			w.log.WarnContext(ctx, "publish result failed; requeueing", "id", id, "err", err)
			return queue.Settlement{Action: queue.Requeue, Reason: "publish_failed"}
		}
	}

	var inErr *wire.InputError
	switch {
	case errors.Is(out.err, errCancelled):
		// The producer no longer wants it: answered, and gone from the
		// queue without a dead letter (nothing is wrong with it).
		w.publishError(ctx, it, out, id, model, wire.ReasonCancelled, out.err.Error())
		return queue.Settlement{Action: queue.Ack}
	case errors.As(out.err, &inErr):
		w.publishError(ctx, it, out, id, model, inErr.Reason, inErr.Message)
		return queue.Settlement{Action: queue.DeadLetter, Reason: inErr.Reason, Description: inErr.Message}
	case inference.KindOf(out.err) == inference.Permanent:
		code := inference.CodeOf(out.err)
		w.publishError(ctx, it, out, id, model, code, out.err.Error())
		return queue.Settlement{Action: queue.DeadLetter, Reason: code, Description: out.err.Error()}
	case d.Attempt >= w.cfg.MaxAttempts:
		code := inference.CodeOf(out.err)
		msg := fmt.Sprintf("gave up after %d attempts; last error: %v", d.Attempt, out.err)
		w.publishError(ctx, it, out, id, model, "max_attempts", msg)
		return queue.Settlement{Action: queue.DeadLetter, Reason: "max_attempts", Description: code + ": " + out.err.Error()}
	default:
		return queue.Settlement{Action: queue.Requeue, Reason: inference.CodeOf(out.err)}
	}
}

// apply hands the settlement to the broker and returns what the broker
// took (a failed dead-letter becomes a requeue); settled is set as soon as
// the broker has it (or has taken the delivery back), so a later panic does
// not settle it again.
func (w *Worker) apply(ctx context.Context, it *item, s queue.Settlement, settled *bool) queue.Settlement {
	err := w.brokerSettle(ctx, it, s, settled)
	switch {
	case err == nil:
		if s.Action == queue.DeadLetter {
			w.dlq.succeeded()
		}
		if s.Action != queue.Ack {
			w.log.InfoContext(ctx, "settled", "id", it.d.ID, "action", s.Action.String(), "reason", s.Reason, "description", s.Description, "attempt", it.d.Attempt)
		}
		return s
	case errors.Is(err, queue.ErrStale):
		w.log.WarnContext(ctx, "delivery went stale before it was settled; the broker redelivers it", "id", it.d.ID, "action", s.Action.String())
		return queue.Settlement{Action: queue.Requeue, Reason: "stale"}
	}
	w.log.ErrorContext(ctx, "settle failed", "id", it.d.ID, "action", s.Action.String(), "err", err)
	if s.Action != queue.DeadLetter {
		return s // the broker redelivers it
	}
	// Never drop: dead-lettering failing (a dead-letter queue missing, full
	// with reject-publish, without quorum) is this worker's fault, not the
	// request's, as an engine outage is. The request goes back to the queue
	// at once, with no attempt counted and marked as answered (its error
	// result went out once), and the worker takes no new work for a pause
	// that grows while dead-lettering keeps failing (see receiveLoop and
	// Ready). Nothing waits here: the requeue runs on a context of its own,
	// so a slow failure cannot leave it an expired one (a nack back instead
	// of a copy, which loses the mark and counts a delivery).
	wait := w.dlq.failed(err, w.now(), w.cfg.RetryBackoff, w.cfg.RetryBackoffMax)
	w.log.ErrorContext(ctx, "dead-lettering failed: the request goes back to the queue (no attempt counted) and this worker takes no new work until the pause ends, then tries again (see /readyz)",
		"id", it.d.ID, "reason", s.Reason, "pause", wait, "err", err)
	w.stopReceiving() // take nothing more while the pause lasts
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
	defer cancel()
	rq := queue.Settlement{Action: queue.Requeue, Reason: queue.ReasonDeadLetterFailed, Headers: map[string]string{headerAnswered: s.Reason}}
	if rerr := w.brokerSettle(rctx, it, rq, settled); rerr != nil && !errors.Is(rerr, queue.ErrStale) {
		w.log.ErrorContext(ctx, "requeue after failed dead-letter", "id", it.d.ID, "err", rerr)
	}
	return rq
}

// headerAnswered marks a request whose error result was published before
// its dead-letter failed: when it comes back it is dead-lettered again
// at once, without an engine call or a second result.
const headerAnswered = "x-sous-answered"

// brokerSettle asks the broker for s; settled is set the moment the broker
// has taken it, before any hook runs.
func (w *Worker) brokerSettle(ctx context.Context, it *item, s queue.Settlement, settled *bool) error {
	end := w.obs.Settling(it.ctx, it.d, s)
	err := it.lane.Broker.Settle(ctx, it.d, s)
	if err == nil || errors.Is(err, queue.ErrStale) {
		*settled = true
	}
	w.obs.ended("Settling end", end, err)
	return err
}

func (w *Worker) publishError(ctx context.Context, it *item, out outcome, id, model, code, msg string) {
	if it.d.Headers[headerAnswered] != "" {
		return // answered before an earlier dead-letter failed
	}
	res := wire.ErrorResult(id, model, code, msg)
	if it.dec != nil && it.dec.Stream {
		done := true
		res.Done = &done
	}
	if err := w.publishResult(ctx, it, res, out); err != nil {
		// The dead-letter queue still holds the request with its reason.
		w.log.WarnContext(ctx, "publish error result", "id", id, "err", err)
	}
}

func (w *Worker) publishResult(ctx context.Context, it *item, res wire.Result, out outcome) error {
	d := it.d
	res.Worker = w.cfg.WorkerID
	if it.lane.Name != lanes.Default {
		res.Lane = it.lane.Name
	}
	res.Attempt = d.Attempt
	res.Batch = out.batch
	if !d.EnqueuedAt.IsZero() {
		res.Timing.QueueMS = max(0, d.ReceivedAt.Sub(d.EnqueuedAt).Milliseconds())
	}
	if !it.dispatched.IsZero() {
		res.Timing.BatchWaitMS = max(0, it.dispatched.Sub(d.ReceivedAt).Milliseconds())
	}
	res.Timing.InferenceMS = out.inference.Milliseconds()
	body, err := wire.Marshal(res)
	if err != nil {
		return err
	}
	m := w.reply(d, body, res.Status)
	err = w.publish(ctx, it, m, res.Status)
	w.headers.Put(m.Headers) // the broker kept nothing of it (Broker.Publish)
	return err
}

// publish publishes m, a result or chunk for it, through the Observer.
func (w *Worker) publish(ctx context.Context, it *item, m queue.Message, status string) error {
	end := w.obs.Publishing(it.ctx, &m, status)
	err := it.lane.Broker.Publish(ctx, m)
	w.obs.ended("Publishing end", end, err)
	return err
}

func (w *Worker) reply(d *queue.Delivery, body []byte, status string) queue.Message {
	to := d.ReplyTo
	if to == "" {
		to = w.cfg.ResultsQueue
	}
	h, _ := w.headers.Get().(map[string]string)
	if h == nil {
		h = make(map[string]string, 1)
	}
	clear(h) // an observer may have added to it (trace context)
	h["x-sous-status"] = status
	return queue.Message{
		To:            to,
		SessionID:     d.ReplyToSessionID,
		CorrelationID: d.CorrelationKey(),
		MessageID:     resultID(d.CorrelationKey()),
		ContentType:   "application/json",
		Body:          body,
		Headers:       h,
		Persistent:    true,
	}
}

// resultID is the result's message id: the request's key + "/result", or a
// digest of a key too long for AMQP's 255-byte message ids.
func resultID(key string) string {
	const suffix = "/result"
	if len(key)+len(suffix) <= 255 {
		return key + suffix
	}
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:16]) + suffix
}
