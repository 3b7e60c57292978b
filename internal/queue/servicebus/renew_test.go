package servicebus

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/queue"
)

// renewDue renews every held lock that is due and waits for those
// renewals: what one tick of renewLoop starts, run to its end, so that
// tests drive the renewer with the fake clock.
func (d *Driver) renewDue(ctx context.Context) {
	d.startRenewals(ctx)
	_ = d.renewers.Wait()
}

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

// Renewals run concurrently: one slow renewal (a slow broker, a link being
// recovered) must not hold back the locks of the other messages, which
// would expire meanwhile. Here every renewal hangs until released; all
// three must be in progress at once.
func TestRenewalsRunConcurrently(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{LockRenewInterval: 10 * time.Second})
	gate := make(chan struct{})
	fx.recv.renewGate = gate
	ds := fx.received(t, lockedFor("m1", fx.clock.Now(), time.Minute), lockedFor("m2", fx.clock.Now(), time.Minute), lockedFor("m3", fx.clock.Now(), time.Minute))
	fx.clock.Advance(10 * time.Second)
	done := make(chan struct{})
	go func() {
		defer close(done)
		fx.d.renewDue(testContext(t))
	}()
	eventually(t, "three renewals in progress at once", func() bool {
		fx.recv.mu.Lock()
		defer fx.recv.mu.Unlock()
		return fx.recv.renewing == 3
	})
	close(gate)
	<-done
	for _, d := range ds {
		if fx.d.Stale(d) {
			t.Errorf("%s is stale after a renewal that succeeded", d.ID)
		}
	}
}

// At most renewParallel renewals run at once; the locks beyond wait for a
// later tick, and the most urgent go first.
func TestRenewalsAreBounded(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{LockRenewInterval: 10 * time.Second})
	gate := make(chan struct{})
	fx.recv.renewGate = gate
	const n = renewParallel + 8
	var msgs []*azservicebus.ReceivedMessage
	for i := range n {
		// m0 is the most urgent: its lock ends first.
		msgs = append(msgs, lockedFor(fmt.Sprintf("m%d", i), fx.clock.Now(), 12*time.Second+time.Duration(i)*time.Millisecond))
	}
	fx.received(t, msgs...)
	fx.clock.Advance(10 * time.Second)
	ctx := testContext(t)
	fx.d.startRenewals(ctx)
	eventually(t, "the bound reached", func() bool {
		fx.recv.mu.Lock()
		defer fx.recv.mu.Unlock()
		return fx.recv.renewing == renewParallel
	})
	fx.d.startRenewals(ctx) // a tick while every slot is taken starts nothing
	for i := range renewParallel {
		if c := fmt.Sprintf("renew m%d", i); fx.recv.count(c) != 1 {
			t.Errorf("%s: %d calls, want the %d most urgent locks renewed first", c, fx.recv.count(c), renewParallel)
		}
	}
	close(gate)
	fx.d.renewDue(ctx) // waits for those, then renews the rest
	fx.d.renewDue(ctx)
	fx.recv.mu.Lock()
	most := fx.recv.maxRenew
	fx.recv.mu.Unlock()
	if most != renewParallel {
		t.Errorf("%d renewals at once, want the bound, %d", most, renewParallel)
	}
	for i := range n {
		if c := fmt.Sprintf("renew m%d", i); fx.recv.count(c) != 1 {
			t.Errorf("%s: %d calls, want 1", c, fx.recv.count(c))
		}
	}
}
