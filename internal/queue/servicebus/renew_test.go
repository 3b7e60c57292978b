package servicebus

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/queue"
)

// lockedFor returns a message whose lock, taken at now, lasts d.
func lockedFor(id string, now time.Time, d time.Duration) *azservicebus.ReceivedMessage {
	m := msg(id)
	until := now.Add(d)
	m.LockedUntil = &until
	return m
}

func TestRenewalSchedule(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		interval time.Duration
		lock     time.Duration // 0: LockedUntil unknown
		want     time.Duration // first renewal after receipt
	}{
		{"interval sooner than half the lock", 10 * time.Second, 60 * time.Second, 10 * time.Second},
		{"half the lock sooner than the interval", 20 * time.Second, 8 * time.Second, 4 * time.Second},
		{"lock unknown", 15 * time.Second, 0, 15 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			fx := setup(t, Config{LockRenewInterval: tt.interval})
			m := msg("m1")
			if tt.lock > 0 {
				m = lockedFor("m1", fx.clock.Now(), tt.lock)
			}
			fx.received(t, m)
			ctx := testContext(t)

			fx.clock.Advance(tt.want - time.Millisecond)
			fx.d.renewDue(ctx)
			if n := fx.recv.count("renew m1"); n != 0 {
				t.Fatalf("renewed %d times before %v", n, tt.want)
			}
			fx.clock.Advance(time.Millisecond)
			fx.d.renewDue(ctx)
			if n := fx.recv.count("renew m1"); n != 1 {
				t.Fatalf("renewed %d times at %v, want 1", n, tt.want)
			}
		})
	}
}

func TestRenewalKeepsGoingWhileHeldAndStopsWhenSettled(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{LockRenewInterval: 10 * time.Second})
	fx.recv.lockFor = 30 * time.Second
	d := fx.received(t, lockedFor("m1", fx.clock.Now(), 30*time.Second))[0]
	ctx := testContext(t)
	for range 5 {
		fx.clock.Advance(10 * time.Second)
		fx.d.renewDue(ctx)
	}
	if n := fx.recv.count("renew m1"); n != 5 {
		t.Fatalf("renewed %d times in 50s held, want 5", n)
	}
	if err := fx.d.Settle(ctx, d, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatal(err)
	}
	fx.clock.Advance(time.Minute)
	fx.d.renewDue(ctx)
	if n := fx.recv.count("renew m1"); n != 5 {
		t.Errorf("renewed a settled delivery: %d renewals", n)
	}
}

// A lock the renewer finds lost is logged, never renewed again, and its
// settlement returns ErrStale without a round trip to the broker.
func TestRenewalFindsALostLock(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{LockRenewInterval: 10 * time.Second})
	d := fx.received(t, lockedFor("m1", fx.clock.Now(), time.Minute))[0]
	fx.recv.renewErr = &azservicebus.Error{Code: azservicebus.CodeLockLost}
	ctx := testContext(t)
	if fx.d.Stale(d) {
		t.Fatal("stale before any renewal failed")
	}
	fx.clock.Advance(10 * time.Second)
	fx.d.renewDue(ctx)
	if !fx.d.Stale(d) {
		t.Fatal("Stale is false after the renewal found the lock lost")
	}
	fx.clock.Advance(10 * time.Second)
	fx.d.renewDue(ctx)
	if n := fx.recv.count("renew m1"); n != 1 {
		t.Errorf("renewed %d times, want 1 (none after the loss)", n)
	}
	if !strings.Contains(fx.logs.String(), "lock lost") || !strings.Contains(fx.logs.String(), `"message_id":"m1"`) {
		t.Errorf("the loss was not logged: %s", fx.logs)
	}
	err := fx.d.Settle(ctx, d, queue.Settlement{Action: queue.Ack})
	if !errors.Is(err, queue.ErrStale) {
		t.Fatalf("Settle = %v, want ErrStale", err)
	}
	if n := fx.recv.count("complete m1"); n != 0 {
		t.Errorf("completed a delivery whose lock was known lost")
	}
	if err := fx.d.Settle(ctx, d, queue.Settlement{Action: queue.Requeue}); err == nil {
		t.Error("a stale delivery was settled again")
	}
}

func TestRenewalRetriesTransientFailures(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{LockRenewInterval: 10 * time.Second})
	d := fx.received(t, lockedFor("m1", fx.clock.Now(), time.Minute))[0]
	fx.recv.renewErr = errBoom
	ctx := testContext(t)
	fx.clock.Advance(10 * time.Second)
	fx.d.renewDue(ctx)
	fx.clock.Advance(time.Second)
	fx.d.renewDue(ctx)
	if n := fx.recv.count("renew m1"); n != 2 {
		t.Fatalf("renewed %d times, want a retry on the next tick", n)
	}
	fx.recv.mu.Lock()
	fx.recv.renewErr = nil
	fx.recv.mu.Unlock()
	fx.clock.Advance(time.Second)
	fx.d.renewDue(ctx)
	if err := fx.d.Settle(ctx, d, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatalf("Settle after a recovered renewal = %v", err)
	}
}

// A renewal that fails after the lock's end is a lost lock, whatever the
// error says.
func TestRenewalFailingPastTheLockIsALoss(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{LockRenewInterval: 10 * time.Second})
	d := fx.received(t, lockedFor("m1", fx.clock.Now(), 30*time.Second))[0]
	fx.recv.renewErr = errBoom
	fx.clock.Advance(31 * time.Second)
	fx.d.renewDue(testContext(t))
	if err := fx.d.Settle(testContext(t), d, queue.Settlement{Action: queue.Ack}); !errors.Is(err, queue.ErrStale) {
		t.Fatalf("Settle = %v, want ErrStale", err)
	}
}

// The renewer goroutine runs on its own and Close stops it.
func TestRenewerRuns(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{LockRenewInterval: 40 * time.Millisecond})
	fx.received(t, lockedFor("m1", fx.clock.Now(), time.Minute))
	fx.d.startRenewer()
	fx.clock.Advance(time.Second)
	eventually(t, "a renewal", func() bool { return fx.recv.count("renew m1") > 0 })
}

func TestRenewalDisabled(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{LockRenewInterval: -1})
	fx.d.startRenewer()
	if fx.d.renewStop != nil {
		t.Fatal("a renewer started with renewal disabled")
	}
}
