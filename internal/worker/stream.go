package worker

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

// chunker coalesces streamed deltas into chunk messages: a chunk goes out
// when StreamBytes have gathered or StreamInterval has passed since the last
// one, so a fast model does not send one message per token.
type chunker struct {
	w    *Worker
	ctx  context.Context
	it   *item
	mu   sync.Mutex
	buf  strings.Builder
	seq  int
	last time.Time
	// start is the engine call's start; first is set at the first output.
	start time.Time
	first bool
	dead  bool // a chunk failed to publish; stop trying, the result still goes

	calls []inference.ToolCall // tool calls for the next chunk
}

func (w *Worker) newChunker(ctx context.Context, it *item) *chunker {
	now := w.now()
	return &chunker{w: w, ctx: ctx, it: it, last: now, start: now}
}

func (c *chunker) add(delta string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.first && delta != "" {
		c.first = true
		c.w.obs.FirstToken(c.it.ctx, c.it.dec.Req.Model, c.w.now().Sub(c.start))
	}
	c.buf.WriteString(delta)
	// The first token goes at once (time to first token is what a reader
	// waits on); later ones are coalesced.
	if c.seq == 0 || c.buf.Len() >= c.w.cfg.StreamBytes || c.w.now().Sub(c.last) >= c.w.cfg.StreamInterval {
		c.send()
	}
}

func (c *chunker) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.buf.Len() > 0 {
		c.send()
	}
}

// addToolCalls sends the text gathered so far and the calls in one chunk,
// at once: a call is whole, and the producer may act on it.
func (c *chunker) addToolCalls(calls []inference.ToolCall) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls = append(c.calls, calls...)
	c.send()
}

func (c *chunker) send() {
	if c.dead {
		c.buf.Reset()
		c.calls = nil
		return
	}
	d := c.it.d
	if st, ok := c.it.lane.Broker.(staler); ok && st.Stale(d) {
		// The broker took the delivery back (a lost lock): the copy it
		// redelivers streams again, so this one must not, as its result
		// is not published either (decide).
		c.dead = true
		c.buf.Reset()
		c.calls = nil
		c.w.log.WarnContext(c.it.ctx, "delivery lost its lock while streaming; sending no more chunks", "id", c.it.dec.ID)
		return
	}
	// A stream starts over (restart) on a redelivery, and when an overloaded
	// batch is retried smaller after this request had already streamed.
	ch := wire.Chunk{ID: c.it.dec.ID, Seq: c.seq, Delta: c.buf.String(), ToolCalls: c.calls, Attempt: d.Attempt, Restart: c.seq == 0 && (d.Attempt > 1 || c.it.streamed.Load())}
	c.calls = nil
	c.it.streamed.Store(true)
	c.buf.Reset()
	c.seq++
	c.last = c.w.now()
	body, _ := wire.Marshal(ch)
	m := c.w.reply(d, body, "chunk")
	m.Persistent = false
	m.MessageID = ""
	ctx, cancel := context.WithTimeout(context.WithoutCancel(c.ctx), 10*time.Second)
	defer cancel()
	if err := c.w.publish(ctx, c.it, m, "chunk"); err != nil {
		c.dead = true
		c.w.log.WarnContext(c.it.ctx, "publish stream chunk failed; the final result will still be sent", "id", c.it.dec.ID, "err", err)
	}
}
