package servicebus

import (
	"context"
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

// renewLoop is the one goroutine that renews locks. Close stops it through
// ctx and waits for it.
func (d *Driver) renewLoop(ctx context.Context, tick time.Duration) {
	defer close(d.renewDone)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			d.renewDue(ctx)
		}
	}
}

// renewDue renews, one at a time, every held lock whose renewal is due.
func (d *Driver) renewDue(ctx context.Context) {
	now := d.now()
	var due []*lockedMessage
	d.mu.Lock()
	for lm := range d.held {
		if lm.state == lockHeld && !lm.lost && !now.Before(lm.next) {
			due = append(due, lm)
		}
	}
	d.mu.Unlock()

	for _, lm := range due {
		if ctx.Err() != nil {
			return
		}
		rctx, cancel := context.WithTimeout(ctx, d.renewTimeout())
		err := d.b.renew.RenewMessageLock(rctx, lm.msg, nil)
		cancel()
		if ctx.Err() != nil {
			return // closing: the outcome no longer matters
		}
		d.renewed(lm, err)
	}
}

// renewed records the outcome of one renewal. The renewer is the only
// writer of lm.msg.LockedUntil (through the SDK), so it reads it unlocked.
func (d *Driver) renewed(lm *lockedMessage, err error) {
	now := d.now()
	gone := err != nil && (lockGone(err) || (lm.msg.LockedUntil != nil && !now.Before(*lm.msg.LockedUntil)))

	d.mu.Lock()
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
