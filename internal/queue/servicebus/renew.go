package servicebus

import (
	"context"
	"slices"
	"time"
)

// renewTick is how often the renewer looks for due locks: a quarter of the
// interval, between 10ms and 1s.
func renewTick(interval time.Duration) time.Duration {
	return min(max(interval/4, 10*time.Millisecond), time.Second)
}

// renewTimeout bounds one RenewMessageLock call, SDK retries included.
func (d *Driver) renewTimeout() time.Duration {
	return max(d.cfg.LockRenewInterval, 5*time.Second)
}

// nextRenewal is when a lock taken or renewed at now, held until
// lockedUntil (nil when unknown), is renewed next: after the renew interval
// or at half the remaining lock time, whichever comes first.
func (d *Driver) nextRenewal(now time.Time, lockedUntil *time.Time) time.Time {
	next := now.Add(d.cfg.LockRenewInterval)
	if lockedUntil != nil {
		if half := lockedUntil.Sub(now) / 2; half > 0 && now.Add(half).Before(next) {
			next = now.Add(half)
		}
	}
	return next
}

// renewParallel bounds the lock renewals in flight at once.
const renewParallel = 32

// renewLoop is the goroutine that starts lock renewals; each runs in a
// goroutine of d.renewers. Close stops the loop through ctx and waits for it
// and for the renewals it started.
func (d *Driver) renewLoop(ctx context.Context, tick time.Duration) {
	defer close(d.renewDone)
	defer func() { _ = d.renewers.Wait() }()
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			d.startRenewals(ctx)
		}
	}
}

// startRenewals starts a renewal for each held lock that is due and not
// being renewed already, the most urgent first, concurrently: one slow
// renewal does not hold back the others, whose locks would expire
// meanwhile. At most renewParallel run at once; a lock beyond that waits
// for a later tick.
func (d *Driver) startRenewals(ctx context.Context) {
	now := d.now()
	var due []*lockedMessage
	d.mu.Lock()
	for lm := range d.held {
		if lm.state == lockHeld && !lm.lost && !lm.renewing && !now.Before(lm.next) {
			due = append(due, lm)
		}
	}
	slices.SortFunc(due, func(a, b *lockedMessage) int { return a.next.Compare(b.next) })
	for _, lm := range due {
		lm.renewing = true
	}
	d.mu.Unlock()

	for i, lm := range due {
		if ctx.Err() != nil || !d.renewers.TryGo(func() error { d.renew(ctx, lm); return nil }) {
			// Closing, or renewParallel renewals in flight: the rest wait
			// for the next tick.
			d.mu.Lock()
			for _, rest := range due[i:] {
				rest.renewing = false
			}
			d.mu.Unlock()
			return
		}
	}
}

// renew renews one lock and records the outcome.
func (d *Driver) renew(ctx context.Context, lm *lockedMessage) {
	rctx, cancel := context.WithTimeout(ctx, d.renewTimeout())
	err := d.b.renew.RenewMessageLock(rctx, lm.msg, nil)
	cancel()
	if ctx.Err() != nil {
		d.mu.Lock()
		lm.renewing = false
		d.mu.Unlock()
		return // closing: the outcome no longer matters
	}
	d.renewed(lm, err)
}

// renewed records the outcome of one renewal. The renewal in flight (at
// most one per lock: lm.renewing) is the only writer of lm.msg.LockedUntil
// (through the SDK), so it reads it unlocked.
func (d *Driver) renewed(lm *lockedMessage, err error) {
	now := d.now()
	gone := err != nil && (lockGone(err) || (lm.msg.LockedUntil != nil && !now.Before(*lm.msg.LockedUntil)))

	d.mu.Lock()
	lm.renewing = false
	if lm.state != lockHeld {
		d.mu.Unlock()
		return // settled meanwhile: a failure is expected and harmless
	}
	switch {
	case err == nil:
		lm.next = d.nextRenewal(now, lm.msg.LockedUntil)
	case gone:
		lm.lost = true
	default:
		lm.next = now // try again on the next tick
	}
	d.mu.Unlock()

	switch {
	case err == nil:
		d.markOK()
	case gone:
		d.log.Warn("servicebus lock lost, the message will be redelivered and its settlement refused",
			"message_id", lm.msg.MessageID, "err", err)
	default:
		d.log.Warn("servicebus lock renewal failed, retrying", "message_id", lm.msg.MessageID, "err", err)
	}
}
