package servicebus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"
	"golang.org/x/sync/errgroup"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/secret"
)

const (
	// readyFresh is how long a successful broker call vouches for the
	// connection, so that Ready probes only an idle driver.
	readyFresh = 10 * time.Second
	// receivePause bounds the pause between ReceiveMessages calls that came
	// back empty while the SDK recovered a link.
	receivePauseMin = 50 * time.Millisecond
	receivePauseMax = 5 * time.Second
	// closeSenderTimeout bounds closing a sender evicted from the cache.
	closeSenderTimeout = 30 * time.Second
	// maxReasonBytes bounds dead-letter reasons and descriptions (Service
	// Bus rejects longer system properties).
	maxReasonBytes = 4096
)

// Driver receives from one Service Bus queue and publishes to any. See the
// package documentation for its concurrency and shutdown contract.
type Driver struct {
	cfg Config
	log *slog.Logger
	b   backend
	now func() time.Time

	recvSlot chan struct{} // held by the one Receive in progress
	stopCtx  context.Context
	stop     context.CancelFunc // StopReceiving and Close

	renewStop context.CancelFunc // nil when renewal is disabled
	renewDone chan struct{}
	renewers  errgroup.Group // the renewals in flight, at most renewParallel

	lastOK  atomic.Int64           // unix nanoseconds of the last successful broker call
	lastErr atomic.Pointer[string] // the SDK's last failed attempt since then (sdklog.go)

	mu      sync.Mutex
	closed  bool
	held    map[*lockedMessage]struct{}
	senders senderCache
}

// lockState is where a received message is in its life.
type lockState int

const (
	lockHeld     lockState = iota // received, renewed, not settled
	lockSettling                  // a Settle call is in progress
	lockFailed                    // a settlement failed; Settle may be retried
	lockDone                      // settled, or its lock is known lost
)

// lockedMessage is the Handle of a Delivery from this driver.
type lockedMessage struct {
	msg *azservicebus.ReceivedMessage

	// Guarded by Driver.mu.
	state    lockState
	lost     bool      // renewal found the lock gone
	renewing bool      // a renewal is in flight
	next     time.Time // next renewal
}

// New builds a Driver for cfg. It does not connect: the first Receive,
// Publish or Ready does. log may be nil.
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Driver, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	opts := cfg.clientOptions
	if opts == nil {
		opts = &azservicebus.ClientOptions{ApplicationID: "sous"}
	}
	var (
		client *azservicebus.Client
		err    error
	)
	if !cfg.ConnectionString.IsZero() {
		client, err = azservicebus.NewClientFromConnectionString(cfg.ConnectionString.Reveal(), opts)
		if err != nil {
			// The SDK's parse errors may quote what they were given.
			return nil, fmt.Errorf("servicebus: SOUS_SERVICEBUS_CONNECTION_STRING is invalid: %s",
				secret.Scrub(err.Error(), connSecrets(cfg.ConnectionString)...))
		}
	} else {
		cred := cfg.Credential
		if cred == nil {
			if cred, err = azidentity.NewDefaultAzureCredential(nil); err != nil {
				return nil, fmt.Errorf("servicebus: azure credential for SOUS_SERVICEBUS_NAMESPACE: %w", err)
			}
		}
		if client, err = azservicebus.NewClient(cfg.Namespace, cred, opts); err != nil {
			return nil, fmt.Errorf("servicebus: client for %q: %w", cfg.Namespace, err)
		}
	}
	r, err := client.NewReceiverForQueue(cfg.Queue, &azservicebus.ReceiverOptions{ReceiveMode: azservicebus.ReceiveModePeekLock})
	if err != nil {
		_ = client.Close(ctx)
		return nil, fmt.Errorf("servicebus: receiver for %q: %w", cfg.Queue, err)
	}
	d := newDriver(cfg, log, sdkBackend(client, r), time.Now)
	watchSDK(d)
	d.startRenewer()
	return d, nil
}

// connSecrets returns the connection string and the key or signature in it,
// for scrubbing error text.
func connSecrets(cs secret.Value) []secret.Value {
	out := []secret.Value{cs}
	for part := range strings.SplitSeq(cs.Reveal(), ";") {
		k, v, ok := strings.Cut(part, "=")
		if ok && (strings.EqualFold(k, "SharedAccessKey") || strings.EqualFold(k, "SharedAccessSignature")) {
			out = append(out, secret.Value(v))
		}
	}
	return out
}

// newDriver assembles a Driver; cfg must have its defaults applied.
func newDriver(cfg Config, log *slog.Logger, b backend, now func() time.Time) *Driver {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Driver{
		cfg:      cfg,
		log:      log.With("queue_driver", "servicebus", "queue", cfg.Queue),
		b:        b,
		now:      now,
		recvSlot: make(chan struct{}, 1),
		held:     make(map[*lockedMessage]struct{}),
		senders:  newSenderCache(cfg.MaxSenders),
	}
	d.stopCtx, d.stop = context.WithCancel(context.Background())
	d.renewers.SetLimit(renewParallel)
	return d
}

// startRenewer starts the lock renewer, unless renewal is disabled. Close
// stops it and waits for it.
func (d *Driver) startRenewer() {
	if d.cfg.LockRenewInterval <= 0 {
		return
	}
	var ctx context.Context
	ctx, d.renewStop = context.WithCancel(context.Background())
	d.renewDone = make(chan struct{})
	go d.renewLoop(ctx, renewTick(d.cfg.LockRenewInterval))
}

// Receive blocks until at least one message is available and returns at
// most max of them, locked (PeekLock). It returns ctx.Err() when ctx ends
// first, and queue.ErrClosed after StopReceiving or Close.
func (d *Driver) Receive(ctx context.Context, max int) ([]*queue.Delivery, error) {
	if max < 1 {
		return nil, fmt.Errorf("servicebus: receive: max must be at least 1, got %d", max)
	}
	max = min(max, maxReceive)

	select {
	case d.recvSlot <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-d.stopCtx.Done():
		return nil, queue.ErrClosed
	}
	defer func() { <-d.recvSlot }()
	if d.stopCtx.Err() != nil {
		return nil, queue.ErrClosed
	}

	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(d.stopCtx, cancel)()

	pause := receivePauseMin
	for {
		msgs, err := d.b.recv.ReceiveMessages(rctx, max, nil)
		if len(msgs) > 0 {
			// Messages that arrived as StopReceiving was called are in-flight
			// work like any other: hand them over.
			return d.hold(msgs), nil
		}
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case d.stopCtx.Err() != nil:
			return nil, queue.ErrClosed
		case err != nil:
			return nil, fmt.Errorf("servicebus: receive from %q: %w", d.cfg.Queue, err)
		}
		// No messages and no error: the SDK dropped a broken link and
		// recovers it on the next call.
		t := time.NewTimer(pause)
		select {
		case <-t.C:
		case <-rctx.Done():
			t.Stop()
		}
		pause = min(2*pause, receivePauseMax)
	}
}

// hold maps received messages and registers them for lock renewal.
func (d *Driver) hold(msgs []*azservicebus.ReceivedMessage) []*queue.Delivery {
	now := d.now()
	out := make([]*queue.Delivery, 0, len(msgs))
	d.mu.Lock()
	for _, m := range msgs {
		lm := &lockedMessage{msg: m, next: d.nextRenewal(now, m.LockedUntil)}
		d.held[lm] = struct{}{}
		del := toDelivery(m, now)
		del.Handle = lm
		out = append(out, del)
	}
	d.mu.Unlock()
	d.markOK()
	return out
}

// Publish sends m to the queue m.To and returns once Service Bus has
// accepted it. m.To may be a queue name or an sb:// address in the same
// namespace.
func (d *Driver) Publish(ctx context.Context, m queue.Message) error {
	to := entityPath(m.To)
	if to == "" {
		return errors.New("servicebus: publish: the message has no destination (To)")
	}
	msg := toMessage(m)
	if err := d.send(ctx, to, func(ctx context.Context, s sender) error { return s.SendMessage(ctx, msg, nil) }); err != nil {
		return fmt.Errorf("servicebus: publish to %q: %w", to, err)
	}
	return nil
}

// send sends one message to the queue to with the cached sender.
func (d *Driver) send(ctx context.Context, to string, do func(context.Context, sender) error) error {
	cs, err := d.acquireSender(to)
	if err != nil {
		return err
	}
	err = do(ctx, cs.s)
	// A sender that failed for another reason than the caller's deadline is
	// replaced: the SDK gives up on links it cannot recover.
	d.releaseSender(cs, err != nil && ctx.Err() == nil)
	if err != nil {
		return err
	}
	d.markOK()
	return nil
}

// Settle completes (Ack), abandons (Requeue) or dead-letters a delivery. A
// lost lock, found by the renewer or reported by Service Bus, returns an
// error wrapping queue.ErrStale: the broker redelivers the message and the
// caller must not retry.
func (d *Driver) Settle(ctx context.Context, del *queue.Delivery, s queue.Settlement) error {
	lm, ok := del.Handle.(*lockedMessage)
	if !ok || lm == nil {
		return fmt.Errorf("servicebus: %s message %q: the delivery was not received by this driver", s.Action, del.ID)
	}
	switch s.Action {
	case queue.Ack, queue.Requeue, queue.DeadLetter:
	default:
		return fmt.Errorf("servicebus: settle message %q: unknown action %d", del.ID, s.Action)
	}

	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return fmt.Errorf("servicebus: %s message %q: %w", s.Action, del.ID, queue.ErrClosed)
	}
	if lm.state == lockSettling || lm.state == lockDone {
		d.mu.Unlock()
		return fmt.Errorf("servicebus: %s message %q: the delivery is already settled", s.Action, del.ID)
	}
	lm.state = lockSettling
	delete(d.held, lm)
	lost := lm.lost
	d.mu.Unlock()

	var err error
	if lost {
		err = queue.ErrStale
	} else {
		err = d.settle(ctx, lm.msg, del, s)
	}

	d.mu.Lock()
	if err == nil || errors.Is(err, queue.ErrStale) {
		lm.state = lockDone
	} else {
		lm.state = lockFailed
	}
	d.mu.Unlock()

	if err != nil {
		return fmt.Errorf("servicebus: %s message %q: %w", s.Action, del.ID, err)
	}
	d.markOK()
	return nil
}

func (d *Driver) settle(ctx context.Context, m *azservicebus.ReceivedMessage, del *queue.Delivery, s queue.Settlement) error {
	switch s.Action {
	case queue.Ack:
		return stale(d.b.settle.CompleteMessage(ctx, m, nil))
	case queue.Requeue:
		var opts *azservicebus.AbandonMessageOptions
		if len(s.Headers) > 0 {
			props := make(map[string]any, len(s.Headers))
			for k, v := range s.Headers {
				props[k] = v
			}
			opts = &azservicebus.AbandonMessageOptions{PropertiesToModify: props}
		}
		return stale(d.b.settle.AbandonMessage(ctx, m, opts))
	}
	reason := truncate(s.Reason)
	if reason == "" {
		reason = "unspecified"
	}
	desc := truncate(s.Description)
	props := map[string]any{
		queue.HeaderDeadLetterReason:      reason,
		queue.HeaderDeadLetterDescription: desc,
		queue.HeaderAttempts:              strconv.Itoa(del.Attempt),
		queue.HeaderSourceQueue:           d.cfg.Queue,
	}
	if d.cfg.DeadLetterQueue == "" {
		return stale(d.b.settle.DeadLetterMessage(ctx, m, &azservicebus.DeadLetterOptions{
			Reason:             &reason,
			ErrorDescription:   &desc,
			PropertiesToModify: props,
		}))
	}
	cp := forwardCopy(m, props)
	if err := d.send(ctx, d.cfg.DeadLetterQueue, func(ctx context.Context, s sender) error { return s.SendAMQPAnnotatedMessage(ctx, cp, nil) }); err != nil {
		return fmt.Errorf("copy to dead-letter queue %q: %w", d.cfg.DeadLetterQueue, err)
	}
	return stale(d.b.settle.CompleteMessage(ctx, m, nil))
}

// stale classifies a settlement error once: a lost lock or a closed receiver
// means Service Bus will redeliver the message.
func stale(err error) error {
	if err == nil {
		return nil
	}
	if lockGone(err) {
		return fmt.Errorf("%w: %w", queue.ErrStale, err)
	}
	return err
}

func lockGone(err error) bool {
	var sbErr *azservicebus.Error
	return errors.As(err, &sbErr) && (sbErr.Code == azservicebus.CodeLockLost || sbErr.Code == azservicebus.CodeClosed)
}

// truncate cuts s to maxReasonBytes on a rune boundary.
func truncate(s string) string {
	if len(s) <= maxReasonBytes {
		return s
	}
	s = s[:maxReasonBytes]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// StopReceiving stops taking new messages: a Receive in progress returns
// queue.ErrClosed, and so does every later one. It waits, within ctx, for
// that Receive to return. Held deliveries can still be settled and results
// published. Messages the broker sends on credit left on the link are
// released back by the SDK, which does not count as a delivery attempt.
func (d *Driver) StopReceiving(ctx context.Context) error {
	d.stop()
	select {
	case d.recvSlot <- struct{}{}:
		<-d.recvSlot
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close stops receiving and lock renewal, then closes the receiver, every
// cached sender and the client. It is safe to call twice and before any
// Receive; the second call returns nil.
func (d *Driver) Close(ctx context.Context) error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	unwatchSDK(d)
	unsettled := len(d.held)
	clear(d.held)
	senders := d.senders.drain()
	d.mu.Unlock()

	d.stop()
	if d.renewStop != nil {
		d.renewStop()
		<-d.renewDone
	}
	if unsettled > 0 {
		d.log.Warn("servicebus closing with unsettled deliveries, Service Bus redelivers them when their locks expire",
			"unsettled", unsettled)
	}

	var errs []error
	// Let a Receive in progress return before its receiver is closed.
	select {
	case d.recvSlot <- struct{}{}:
		defer func() { <-d.recvSlot }()
	case <-ctx.Done():
		errs = append(errs, ctx.Err())
	}
	if err := d.b.recv.Close(ctx); err != nil {
		errs = append(errs, fmt.Errorf("receiver: %w", err))
	}
	for _, s := range senders {
		if err := s.Close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("sender: %w", err))
		}
	}
	if d.b.close != nil {
		if err := d.b.close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("client: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("servicebus: close: %w", err)
	}
	return nil
}

// Ready reports whether the driver can reach Service Bus. It is cheap: a
// broker call that succeeded in the last readyFresh is proof enough;
// otherwise it peeks past the end of the queue (one management round trip,
// no message data, no lock).
func (d *Driver) Ready(ctx context.Context) error {
	d.mu.Lock()
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return queue.ErrClosed
	}
	if last := d.lastOK.Load(); last != 0 && d.now().Sub(time.Unix(0, last)) < readyFresh {
		return nil
	}
	end := int64(math.MaxInt64)
	if _, err := d.b.peek.PeekMessages(ctx, 1, &azservicebus.PeekMessagesOptions{FromSequenceNumber: &end}); err != nil {
		if last := d.lastErr.Load(); last != nil {
			// The SDK was still retrying when ctx ended: say why.
			return fmt.Errorf("servicebus: ready: %w (last failed attempt: %s)", err, *last)
		}
		return fmt.Errorf("servicebus: ready: %w", err)
	}
	d.markOK()
	return nil
}

func (d *Driver) markOK() {
	d.lastOK.Store(d.now().UnixNano())
	d.lastErr.Store(nil)
}

// Stale reports whether del's lock is known to be lost, so the worker can
// skip publishing a result the broker will cause to be produced again on
// redelivery. False when unknown.
func (d *Driver) Stale(del *queue.Delivery) bool {
	lm, ok := del.Handle.(*lockedMessage)
	if !ok || lm == nil {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return lm.lost
}
