package servicebus

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"
	"github.com/Azure/go-amqp"

	"github.com/sous-run/sous/internal/queue/servicebus/sbpeer"
)

// The peer's sessions, driven by the SDK's own session receiver (the
// Service Bus request/reply pattern the gateway uses): a session-enabled
// queue refuses messages without a session id and plain receivers; a
// session receiver gets its session's messages only, in order, presettled
// in ReceiveAndDelete mode; the session is locked to one receiver until it
// closes, and its lock can be renewed.
func TestPeerSessions(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	p.RequireSessions("replies")
	client, err := azservicebus.NewClientFromConnectionString(p.ConnectionString(), &azservicebus.ClientOptions{RetryOptions: peerRetries})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close(context.Background()) })
	ctx := testContext(t)
	sender, err := client.NewSender("replies", nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 6 {
		sid := []string{"a", "b"}[i%2]
		body := fmt.Sprintf("%s-%d", sid, i/2)
		if err := sender.SendMessage(ctx, &azservicebus.Message{Body: []byte(body), SessionID: &sid}, nil); err != nil {
			t.Fatalf("send %s: %v", body, err)
		}
	}
	var amqpErr *amqp.Error
	if err := sender.SendMessage(ctx, &azservicebus.Message{Body: []byte("no session")}, nil); !errors.As(err, &amqpErr) || amqpErr.Condition != amqp.ErrCondNotAllowed {
		t.Errorf("send without a session id to a session queue: %v, want amqp:not-allowed", err)
	}

	opts := &azservicebus.SessionReceiverOptions{ReceiveMode: azservicebus.ReceiveModeReceiveAndDelete}
	a, err := client.AcceptSessionForQueue(ctx, "replies", "a", opts)
	if err != nil {
		t.Fatalf("AcceptSessionForQueue a: %v", err)
	}
	if until := a.LockedUntil(); until.Before(time.Now()) || until.After(time.Now().Add(time.Minute)) {
		t.Errorf("LockedUntil = %v, want within the 30s lock duration", until)
	}
	var got []string
	for len(got) < 3 {
		msgs, err := a.ReceiveMessages(ctx, 10, &azservicebus.ReceiveMessagesOptions{TimeAfterFirstMessage: time.Millisecond})
		if err != nil {
			t.Fatalf("ReceiveMessages: %v", err)
		}
		for _, m := range msgs {
			if m.SessionID == nil || *m.SessionID != "a" {
				t.Errorf("session a got a message of session %v", m.SessionID)
			}
			got = append(got, string(m.Body))
		}
	}
	if fmt.Sprint(got) != "[a-0 a-1 a-2]" {
		t.Errorf("session a received %v, want [a-0 a-1 a-2] in order", got)
	}
	if s := p.Stats()["replies"]; s.Available != 3 || s.Locked != 0 {
		t.Errorf("replies after session a was received and deleted: %+v, want session b's 3", s)
	}
	if !p.Find(func(e sbpeer.Event) bool { return e.Name == "delivered" && e.Settled })[0].Settled {
		t.Error("no presettled delivery")
	}

	_, err = client.AcceptSessionForQueue(ctx, "replies", "a", opts)
	if !errors.As(err, &amqpErr) || amqpErr.Condition != "com.microsoft:session-cannot-be-locked" {
		t.Errorf("a second receiver for the locked session a: %v, want com.microsoft:session-cannot-be-locked", err)
	}
	if _, err := client.NewReceiverForQueue("replies", nil); err == nil {
		// The SDK attaches lazily: the refusal comes with the first receive.
		r, _ := client.NewReceiverForQueue("replies", nil)
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := r.ReceiveMessages(rctx, 1, nil)
		cancel()
		if !errors.As(err, &amqpErr) || amqpErr.Condition != amqp.ErrCondNotAllowed {
			t.Errorf("a plain receiver on a session queue: %v, want amqp:not-allowed", err)
		}
	}

	if err := a.RenewSessionLock(ctx, nil); err != nil {
		t.Errorf("RenewSessionLock: %v", err)
	}
	p.WaitFor(wait, "the renewal", func(e sbpeer.Event) bool { return e.Name == "renew_session_lock" && e.OK })
	if err := a.Close(ctx); err != nil {
		t.Fatal(err)
	}
	p.WaitFor(wait, "session a unlocked", func(e sbpeer.Event) bool { return e.Name == "session_unlocked" && e.SessionID == "a" })
	again, err := client.AcceptSessionForQueue(ctx, "replies", "a", opts)
	if err != nil {
		t.Fatalf("accept session a after its receiver closed: %v", err)
	}
	_ = again.Close(ctx)

	p.SetMaxMessages("small", 1)
	small, err := client.NewSender("small", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := small.SendMessage(ctx, &azservicebus.Message{Body: []byte("1")}, nil); err != nil {
		t.Fatalf("first send to a queue of one: %v", err)
	}
	if err := small.SendMessage(ctx, &azservicebus.Message{Body: []byte("2")}, nil); !errors.As(err, &amqpErr) || amqpErr.Condition != amqp.ErrCondResourceLimitExceeded {
		t.Errorf("send to a full queue: %v, want amqp:resource-limit-exceeded", err)
	}
}

// A session lock that is not renewed runs out: the peer detaches the link
// with com.microsoft:session-lock-lost, and the SDK, which treats that as
// a link to recover, accepts the session again on its next operation.
func TestPeerSessionLockExpires(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{LockDuration: 300 * time.Millisecond})
	p.RequireSessions("replies")
	client, err := azservicebus.NewClientFromConnectionString(p.ConnectionString(), &azservicebus.ClientOptions{RetryOptions: peerRetries})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close(context.Background()) })
	ctx := testContext(t)
	r, err := client.AcceptSessionForQueue(ctx, "replies", "s", &azservicebus.SessionReceiverOptions{ReceiveMode: azservicebus.ReceiveModeReceiveAndDelete})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	p.WaitFor(wait, "the session lock to run out", func(e sbpeer.Event) bool { return e.Name == "session_lock_lost" && e.SessionID == "s" })
	p.WaitFor(wait, "the link detached", func(e sbpeer.Event) bool { return e.Name == "session_unlocked" && e.SessionID == "s" })
	if err := r.RenewSessionLock(ctx, nil); err != nil {
		t.Errorf("RenewSessionLock after the SDK recovered the link: %v", err)
	}
	p.WaitForN(wait, 2, "the session accepted again", func(e sbpeer.Event) bool { return e.Name == "session_locked" && e.SessionID == "s" })
}
