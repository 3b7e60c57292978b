package gateway

import (
	"context"
	"encoding/json"
	"sync"
	"testing"

	"go.uber.org/goleak"

	"github.com/sous-run/sous/internal/wire"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeBroker records what is sent; answer scripts the replies of each call.
type fakeBroker struct {
	mu     sync.Mutex
	sent   []Message
	err    error
	answer func(m Message, c *fakeCall)
	calls  []*fakeCall
}

func (b *fakeBroker) Send(_ context.Context, m Message) (Call, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return nil, b.err
	}
	b.sent = append(b.sent, m)
	c := &fakeCall{notify: make(chan struct{}, 1)}
	b.calls = append(b.calls, c)
	if b.answer != nil {
		go b.answer(m, c)
	}
	return c, nil
}

func (b *fakeBroker) Ready(context.Context) error { return b.err }

func (b *fakeBroker) last(t *testing.T) wire.Request {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.sent) == 0 {
		t.Fatal("nothing was published")
	}
	var r wire.Request
	if err := json.Unmarshal(b.sent[len(b.sent)-1].Body, &r); err != nil {
		t.Fatal(err)
	}
	return r
}

type fakeCall struct {
	notify  chan struct{}
	mu      sync.Mutex
	replies []Reply
	err     error
	closed  bool
}

func (c *fakeCall) Notify() <-chan struct{} { return c.notify }

func (c *fakeCall) Take() ([]Reply, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.replies
	c.replies = nil
	if len(r) > 0 {
		return r, nil
	}
	return nil, c.err
}

func (c *fakeCall) Close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
}

func (c *fakeCall) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func (c *fakeCall) push(chunk bool, v any) {
	b, _ := json.Marshal(v)
	c.mu.Lock()
	c.replies = append(c.replies, Reply{Chunk: chunk, Body: b})
	c.mu.Unlock()
	select {
	case c.notify <- struct{}{}:
	default:
	}
}

func (c *fakeCall) fail(err error) {
	c.mu.Lock()
	c.err = err
	c.mu.Unlock()
	select {
	case c.notify <- struct{}{}:
	default:
	}
}
