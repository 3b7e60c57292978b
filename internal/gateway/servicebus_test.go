package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/queue/servicebus/sbpeer"
	"github.com/sous-run/sous/internal/secret"
)

// These tests drive the real azservicebus SDK against sbpeer, the
// project's AMQP 1.0 test double for Service Bus (not an emulator; it
// fails, not skips, without python3-qpid-proton: `make sbpeer`).

const sbWait = 15 * time.Second

func openServiceBus(t *testing.T, p *sbpeer.Peer, mod func(*ServiceBusConfig)) *ServiceBus {
	t.Helper()
	p.RequireSessions("replies")
	cfg := ServiceBusConfig{
		ConnectionString: secret.Value(p.ConnectionString()), Queue: "requests", ReplyQueue: "replies", Sessions: 2,
		ClientOptions: &azservicebus.ClientOptions{RetryOptions: azservicebus.RetryOptions{MaxRetries: 1, RetryDelay: 50 * time.Millisecond, MaxRetryDelay: 200 * time.Millisecond}},
	}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), sbWait)
	defer cancel()
	s, err := OpenServiceBus(ctx, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// playSBWorker plays a worker for the request with correlation id id: it
// answers with n chunks and a result in the request's reply session.
func playSBWorker(t *testing.T, p *sbpeer.Peer, id string, n int) sbpeer.Event {
	t.Helper()
	req := p.WaitFor(sbWait, "request "+id, func(e sbpeer.Event) bool {
		return e.Name == "enqueued" && e.Queue == "requests" && e.CorrelationID == id
	})
	for i := range n + 1 {
		status, body := "chunk", fmt.Sprintf(`{"seq":%d}`, i)
		if i == n {
			status, body = "ok", `{"status":"ok"}`
		}
		p.Enqueue(sbpeer.Send{Queue: req.ReplyTo, SessionID: req.ReplyToSessionID, CorrelationID: id, Body: body,
			ApplicationProperties: map[string]string{"x-sous-status": status}})
	}
	return req
}

// Requests carry the reply queue and one of the gateway's sessions; the
// replies of each come back in order, on more than one session.
func TestServiceBusRoundTrip(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	s := openServiceBus(t, p, nil)
	ctx := context.Background()
	sessions := map[string]bool{}
	for i := range 4 {
		id := fmt.Sprint("r", i)
		c, err := s.Send(ctx, Message{ID: id, Body: []byte(`{"prompt":"x"}`), Headers: map[string]string{"traceparent": "00-abc-def-01"}})
		if err != nil {
			t.Fatal(err)
		}
		req := playSBWorker(t, p, id, 20)
		if req.MessageID != id || req.ReplyTo != "replies" || !strings.HasPrefix(req.ReplyToSessionID, "sous-gateway-") ||
			req.ApplicationProperties["traceparent"] != "00-abc-def-01" || req.ContentType != "application/json" || req.Body != `{"prompt":"x"}` {
			t.Fatalf("published %s", req)
		}
		sessions[req.ReplyToSessionID] = true
		rs := waitReplies(t, c, 21)
		for j, r := range rs[:20] {
			if !r.Chunk || string(r.Body) != fmt.Sprintf(`{"seq":%d}`, j) {
				t.Fatalf("reply %d = %+v %s, want chunk %d in order", j, r.Chunk, r.Body, j)
			}
		}
		if rs[20].Chunk || string(rs[20].Body) != `{"status":"ok"}` {
			t.Fatalf("last reply %+v %s", rs[20].Chunk, rs[20].Body)
		}
		c.Close()
	}
	if len(sessions) != 2 {
		t.Errorf("requests named sessions %v, want both of the gateway's", sessions)
	}
	// A reply nobody waits for is dropped and counted.
	p.Enqueue(sbpeer.Send{Queue: "replies", SessionID: s.lanes[0].session, CorrelationID: "gone", Body: "{}"})
	deadline := time.Now().Add(sbWait)
	for s.LateReplies() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("late replies %d, want 1", s.LateReplies())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := p.Stats()["replies"]; st.Available != 0 || st.Locked != 0 {
		t.Errorf("replies left in the reply queue: %+v (ReceiveAndDelete)", st)
	}
}

// A full request queue (amqp:resource-limit-exceeded) is ErrQueueFull.
func TestServiceBusQueueFull(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	s := openServiceBus(t, p, nil)
	p.SetMaxMessages("requests", 1)
	ctx := context.Background()
	c, err := s.Send(ctx, Message{ID: "first", Body: []byte(`{}`)})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if _, err := s.Send(ctx, Message{ID: "second", Body: []byte(`{}`)}); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("send to a full queue: %v, want ErrQueueFull", err)
	}
	for _, l := range s.lanes {
		if n := len(l.calls); n != 0 {
			t.Errorf("%d calls left registered after the refused send", n)
		}
	}
}

// The broker going away fails the calls in flight and later sends with
// ErrUnavailable, and Ready reports it.
func TestServiceBusBrokerGone(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	s := openServiceBus(t, p, func(c *ServiceBusConfig) { c.ReconnectMax = 100 * time.Millisecond })
	ctx := context.Background()
	if err := s.Ready(ctx); err != nil {
		t.Fatalf("Ready: %v", err)
	}
	c, err := s.Send(ctx, Message{ID: "waiting", Body: []byte(`{}`)})
	if err != nil {
		t.Fatal(err)
	}
	p.Stop()
	deadline := time.After(sbWait)
	for {
		if _, err := c.Take(); err != nil {
			if !errors.Is(err, ErrUnavailable) {
				t.Errorf("call in flight failed with %v, want ErrUnavailable", err)
			}
			break
		}
		select {
		case <-c.Notify():
		case <-deadline:
			t.Fatal("the call in flight did not fail after the broker went away")
		}
	}
	sctx, cancel := context.WithTimeout(ctx, sbWait)
	defer cancel()
	if _, err := s.Send(sctx, Message{ID: "later", Body: []byte(`{}`)}); !errors.Is(err, ErrUnavailable) {
		t.Errorf("send without a broker: %v, want ErrUnavailable", err)
	}
	if err := s.Ready(ctx); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Ready without a broker: %v", err)
	}
}

// A reply queue without sessions: Open waits for a session, then fails
// with ErrUnavailable, naming the reply queue.
func TestServiceBusReplyQueueWithoutSessions(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := OpenServiceBus(ctx, ServiceBusConfig{ConnectionString: secret.Value(p.ConnectionString()), Queue: "requests", ReplyQueue: "plain"}, slog.New(slog.DiscardHandler))
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), `"plain"`) {
		t.Fatalf("open with a reply queue without sessions: %v", err)
	}
	p.WaitFor(sbWait, "the session refused", func(e sbpeer.Event) bool {
		return e.Name == "session_refused" && e.Condition == "amqp:not-allowed"
	})
}

// The gateway renews its sessions' locks: a request that waits several
// lock durations still gets its answer, and no lock runs out.
func TestServiceBusRenewsSessionLocks(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{LockDuration: 400 * time.Millisecond})
	s := openServiceBus(t, p, nil)
	c, err := s.Send(context.Background(), Message{ID: "slow", Body: []byte(`{}`)})
	if err != nil {
		t.Fatal(err)
	}
	p.WaitForN(sbWait, 6, "renewals", func(e sbpeer.Event) bool { return e.Name == "renew_session_lock" && e.OK })
	playSBWorker(t, p, "slow", 1)
	waitReplies(t, c, 2)
	if lost := p.Find(func(e sbpeer.Event) bool { return e.Name == "session_lock_lost" }); len(lost) > 0 {
		t.Errorf("session locks ran out: %v", lost)
	}
}

// fakeSession is a sessionReceiver whose receives and renewals the test
// scripts.
type fakeSession struct {
	receive func(ctx context.Context) ([]*azservicebus.ReceivedMessage, error)
	renew   func(ctx context.Context) error
}

func (f fakeSession) ReceiveMessages(ctx context.Context, _ int, _ *azservicebus.ReceiveMessagesOptions) ([]*azservicebus.ReceivedMessage, error) {
	return f.receive(ctx)
}

func (f fakeSession) RenewSessionLock(ctx context.Context, _ *azservicebus.RenewSessionLockOptions) error {
	return f.renew(ctx)
}

func (fakeSession) LockedUntil() time.Time { return time.Now().Add(time.Second) }

func fakeLane() *sbLane {
	sb := &ServiceBus{cfg: ServiceBusConfig{RenewInterval: 20 * time.Millisecond}, log: slog.New(slog.DiscardHandler)}
	return &sbLane{sb: sb, session: "s", calls: map[string]*call{}, up: true}
}

// The SDK's ReceiveMessages returns nothing and no error when its link
// failed; the lane takes that as the session lost, not as an empty poll.
func TestLaneEmptyReceiveIsAFailure(t *testing.T) {
	t.Parallel()
	l := fakeLane()
	id := "r1"
	n := 0
	err := l.receive(context.Background(), fakeSession{
		receive: func(context.Context) ([]*azservicebus.ReceivedMessage, error) {
			n++
			if n == 1 {
				return []*azservicebus.ReceivedMessage{{CorrelationID: &id, Body: []byte("{}")}}, nil
			}
			return nil, nil
		},
		renew: func(context.Context) error { return nil },
	})
	if err == nil || n != 2 {
		t.Fatalf("receive ended with %v after %d receives, want an error after the empty one", err, n)
	}
	if l.sb.LateReplies() != 1 {
		t.Errorf("late replies %d, want the reply nobody waited for", l.sb.LateReplies())
	}
}

// A session lock that cannot be renewed ends the receive with the
// renewal's error.
func TestLaneRenewalFailureEndsTheReceive(t *testing.T) {
	t.Parallel()
	l := fakeLane()
	renewals := 0
	err := l.receive(context.Background(), fakeSession{
		receive: func(ctx context.Context) ([]*azservicebus.ReceivedMessage, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		},
		renew: func(context.Context) error {
			if renewals++; renewals == 3 {
				return errors.New("session lock lost")
			}
			return nil
		},
	})
	if err == nil || !strings.Contains(err.Error(), "renew the session lock: session lock lost") || renewals != 3 {
		t.Fatalf("receive ended with %v after %d renewals", err, renewals)
	}
}

// Lanes: a sender per lane queue; each request goes to the queue its
// Message names (a lane's), one that names none to Queue, and a queue
// that is not among them is ErrNoQueue without a send.
func TestServiceBusLanes(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	s := openServiceBus(t, p, func(c *ServiceBusConfig) { c.LaneQueues = []string{"interactive", "bulk"} })
	ctx := context.Background()
	for _, tc := range []struct{ id, queue, want string }{{"b1", "bulk", "bulk"}, {"i1", "interactive", "interactive"}, {"d1", "", "requests"}} {
		c, err := s.Send(ctx, Message{ID: tc.id, Queue: tc.queue, Body: []byte(`{"prompt":"x"}`)})
		if err != nil {
			t.Fatal(err)
		}
		req := p.WaitFor(sbWait, "request "+tc.id, func(e sbpeer.Event) bool { return e.Name == "enqueued" && e.CorrelationID == tc.id })
		if req.Queue != tc.want {
			t.Errorf("%s went to %q, want %q", tc.id, req.Queue, tc.want)
		}
		// The answer comes back in the reply session, whatever the lane.
		p.Enqueue(sbpeer.Send{Queue: req.ReplyTo, SessionID: req.ReplyToSessionID, CorrelationID: tc.id, Body: `{"status":"ok"}`,
			ApplicationProperties: map[string]string{"x-sous-status": "ok"}})
		if rs := waitReplies(t, c, 1); len(rs) != 1 || string(rs[0].Body) != `{"status":"ok"}` {
			t.Fatalf("%s: replies %+v", tc.id, rs)
		}
		c.Close()
	}
	if _, err := s.Send(ctx, Message{ID: "x", Queue: "nowhere", Body: []byte(`{}`)}); !errors.Is(err, ErrNoQueue) {
		t.Fatalf("send to a queue that is no lane's: %v, want ErrNoQueue", err)
	}
	if got := p.Find(func(e sbpeer.Event) bool { return e.Name == "enqueued" && e.Queue == "nowhere" }); len(got) != 0 {
		t.Errorf("sent to a queue that is no lane's: %v", got)
	}
}
