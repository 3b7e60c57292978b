package rabbitmq

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/secret"
)

// Config configures a Driver.
type Config struct {
	// URL is the broker URL, amqp:// or amqps://. Secret: it holds a password.
	URL secret.Value
	// TLS is used for amqps:// URLs; nil means the system roots.
	TLS *tls.Config
	// Queue is the input queue.
	Queue string
	// DeadLetterQueue receives messages that cannot be processed.
	DeadLetterQueue string
	// Declare makes the driver declare Queue, DeadLetterQueue and
	// ExtraQueues (durable quorum queues). Existing queues with other
	// arguments are used as they are.
	Declare bool
	// ExtraQueues are declared too (the results queue).
	ExtraQueues []string
	// DeliveryLimit is the broker-side backstop (x-delivery-limit) after which
	// the broker itself dead-letters a message; 0 sets none.
	DeliveryLimit int
	// Prefetch is the initial consumer prefetch; SetPrefetch changes it.
	Prefetch int
	// ConnectionName shows in the management UI.
	ConnectionName string
	// ReconnectMin and ReconnectMax bound the reconnect backoff
	// (defaults 250ms and 15s).
	ReconnectMin, ReconnectMax time.Duration
	// Consume can be false for a driver that only publishes (sousctl).
	Consume bool
	// OnReconnect, if set, is called after each reconnect that follows a
	// lost connection (not after the first connect), from the driver's
	// supervisor goroutine. It must return quickly: for a metric.
	OnReconnect func()
}

// Driver is a RabbitMQ queue driver. Create it with Open.
type Driver struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	sess     *session      // nil while disconnected
	ready    chan struct{} // closed when sess is set; replaced on loss
	prefetch int
	stopped  bool // StopReceiving was called
	closed   bool

	pending []amqp.Delivery // drained from a cancelled consumer, still valid

	stop   context.CancelFunc
	done   chan struct{}
	closeO sync.Once
}

// session is one connection and its channels. It is immutable once built,
// apart from the mutexes that serialise frames on each channel.
type session struct {
	conn       *amqp.Connection
	cons       *amqp.Channel
	pub        *amqp.Channel
	consMu     sync.Mutex // serialises ack/nack/qos on cons
	pubMu      sync.Mutex // serialises publishes on pub
	deliveries <-chan amqp.Delivery
	tag        string
	dead       chan struct{} // closed when the connection or a channel closes
}

type handle struct {
	s   *session
	tag uint64
	raw amqp.Delivery
}

// Open connects (retrying until ctx is done) and starts the supervisor.
func Open(ctx context.Context, cfg Config, log *slog.Logger) (*Driver, error) {
	if cfg.ReconnectMin <= 0 {
		cfg.ReconnectMin = 250 * time.Millisecond
	}
	if cfg.ReconnectMax <= 0 {
		cfg.ReconnectMax = 15 * time.Second
	}
	if cfg.Prefetch <= 0 {
		cfg.Prefetch = 1
	}
	d := &Driver{cfg: cfg, log: log.With("broker", "rabbitmq", "queue", cfg.Queue), ready: make(chan struct{}), prefetch: cfg.Prefetch, done: make(chan struct{})}
	s, err := d.connect(ctx)
	if err != nil {
		return nil, err
	}
	d.setSession(s)
	runCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	d.stop = stop
	go d.supervise(runCtx)
	return d, nil
}

func (d *Driver) setSession(s *session) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.sess = s
	close(d.ready)
}

// supervise waits for the session to die and reconnects with backoff.
func (d *Driver) supervise(ctx context.Context) {
	defer close(d.done)
	for {
		d.mu.Lock()
		s := d.sess
		d.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-s.dead:
		}
		d.mu.Lock()
		d.sess, d.ready = nil, make(chan struct{})
		d.pending = nil // their channel is gone; the broker redelivers them
		d.mu.Unlock()
		d.log.Warn("broker connection lost; reconnecting")
		next, err := d.connect(ctx)
		if err != nil {
			return // ctx done
		}
		d.setSession(next)
		d.log.Info("broker reconnected")
		if d.cfg.OnReconnect != nil {
			d.cfg.OnReconnect()
		}
	}
}

// connect dials until it succeeds or ctx is done.
func (d *Driver) connect(ctx context.Context) (*session, error) {
	wait := d.cfg.ReconnectMin
	for attempt := 1; ; attempt++ {
		s, err := d.dial(ctx)
		if err == nil {
			return s, nil
		}
		d.log.Warn("broker connect failed", "attempt", attempt, "err", err, "retry_in", wait)
		jitter := time.Duration(rand.Int64N(int64(wait)/2 + 1))
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to RabbitMQ at %s: %w (last error: %v)", secret.URL(d.cfg.URL.Reveal()), ctx.Err(), err)
		case <-time.After(wait + jitter):
		}
		wait = min(wait*2, d.cfg.ReconnectMax)
	}
}

func (d *Driver) dial(ctx context.Context) (s *session, err error) {
	dialer := amqp.DefaultDial(10 * time.Second)
	conn, err := amqp.DialConfig(d.cfg.URL.Reveal(), amqp.Config{
		Heartbeat:       10 * time.Second,
		TLSClientConfig: d.cfg.TLS,
		Properties:      amqp.Table{"connection_name": d.cfg.ConnectionName},
		Dial:            dialer,
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s: %s", secret.URL(d.cfg.URL.Reveal()), secret.Scrub(err.Error(), d.cfg.URL))
	}
	defer func() {
		if err != nil {
			_ = conn.Close()
		}
	}()
	if d.cfg.Declare {
		if err := d.declare(conn); err != nil {
			return nil, err
		}
	}
	s = &session{conn: conn, dead: make(chan struct{})}
	if s.pub, err = conn.Channel(); err != nil {
		return nil, fmt.Errorf("open publish channel: %w", err)
	}
	if err := s.pub.Confirm(false); err != nil {
		return nil, fmt.Errorf("enable publisher confirms: %w", err)
	}
	if s.cons, err = conn.Channel(); err != nil {
		return nil, fmt.Errorf("open consume channel: %w", err)
	}
	d.mu.Lock()
	consume := d.cfg.Consume && !d.stopped
	prefetch := d.prefetch
	d.mu.Unlock()
	if consume {
		if err := s.consume(d.cfg.Queue, prefetch); err != nil {
			return nil, err
		}
	}
	// Every notification channel is buffered and drained (amqp091-go's
	// best practice): an undrained one would deadlock the connection.
	connClosed := conn.NotifyClose(make(chan *amqp.Error, 1))
	pubClosed := s.pub.NotifyClose(make(chan *amqp.Error, 1))
	consClosed := s.cons.NotifyClose(make(chan *amqp.Error, 1))
	blocked := conn.NotifyBlocked(make(chan amqp.Blocking, 4))
	go func() {
		var why *amqp.Error
		select {
		case why = <-connClosed:
		case why = <-pubClosed:
		case why = <-consClosed:
		}
		if why != nil {
			d.log.Warn("broker channel closed", "code", why.Code, "reason", why.Reason, "server", why.Server)
		}
		close(s.dead)
		_ = conn.Close()
	}()
	go func() {
		for b := range blocked {
			if b.Active {
				d.log.Warn("broker blocked publishing (resource alarm)", "reason", b.Reason)
			} else {
				d.log.Info("broker unblocked publishing")
			}
		}
	}()
	return s, nil
}

func (s *session) consume(queueName string, prefetch int) error {
	s.consMu.Lock()
	defer s.consMu.Unlock()
	if err := s.cons.Qos(prefetch, 0, false); err != nil {
		return fmt.Errorf("set prefetch %d: %w", prefetch, err)
	}
	s.tag = "sous-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	dl, err := s.cons.Consume(queueName, s.tag, false, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume from queue %q: %w", queueName, err)
	}
	s.deliveries = dl
	return nil
}

// declare declares the topology, tolerating queues that already exist with
// other arguments.
func (d *Driver) declare(conn *amqp.Connection) error {
	type q struct {
		name string
		args amqp.Table
	}
	qs := []q{{d.cfg.DeadLetterQueue, amqp.Table{"x-queue-type": "quorum"}}}
	if d.cfg.Queue != "" {
		args := amqp.Table{"x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": d.cfg.DeadLetterQueue}
		if d.cfg.DeliveryLimit > 0 {
			args["x-delivery-limit"] = int64(d.cfg.DeliveryLimit)
		}
		qs = append(qs, q{d.cfg.Queue, args})
	}
	for _, name := range d.cfg.ExtraQueues {
		qs = append(qs, q{name, amqp.Table{"x-queue-type": "quorum"}})
	}
	for _, q := range qs {
		if q.name == "" {
			continue
		}
		ch, err := conn.Channel()
		if err != nil {
			return fmt.Errorf("open channel to declare %q: %w", q.name, err)
		}
		_, err = ch.QueueDeclare(q.name, true, false, false, false, q.args)
		var aerr *amqp.Error
		if errors.As(err, &aerr) && aerr.Code == amqp.PreconditionFailed {
			// The queue exists with other arguments (a classic queue, say):
			// use it as it is rather than refuse to start.
			d.log.Warn("queue exists with other arguments; using it as it is", "name", q.name, "detail", aerr.Reason)
			if ch, err = conn.Channel(); err != nil {
				return fmt.Errorf("open channel to check %q: %w", q.name, err)
			}
			_, err = ch.QueueDeclarePassive(q.name, true, false, false, false, nil)
		}
		if err != nil {
			return fmt.Errorf("declare queue %q: %w", q.name, err)
		}
		_ = ch.Close()
	}
	return nil
}

// current returns the live session, waiting for a reconnect if needed.
func (d *Driver) current(ctx context.Context) (*session, error) {
	for {
		d.mu.Lock()
		s, ready, closed := d.sess, d.ready, d.closed
		d.mu.Unlock()
		if closed {
			return nil, queue.ErrClosed
		}
		if s != nil {
			return s, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-ready:
		}
	}
}

// Receive blocks until at least one delivery is available, then returns up
// to max of them without waiting for more.
func (d *Driver) Receive(ctx context.Context, max int) ([]*queue.Delivery, error) {
	if max < 1 {
		max = 1
	}
	for {
		d.mu.Lock()
		stopped := d.stopped
		if len(d.pending) > 0 && d.sess != nil {
			n := min(max, len(d.pending))
			out := make([]*queue.Delivery, 0, n)
			for _, raw := range d.pending[:n] {
				out = append(out, d.toDelivery(d.sess, raw))
			}
			d.pending = d.pending[n:]
			d.mu.Unlock()
			return out, nil
		}
		d.mu.Unlock()
		if stopped {
			return nil, queue.ErrClosed
		}
		s, err := d.current(ctx)
		if err != nil {
			return nil, err
		}
		var first amqp.Delivery
		var ok bool
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-s.dead:
			continue
		case first, ok = <-s.deliveries:
		}
		if !ok {
			// Consumer cancelled (SetPrefetch or StopReceiving) or channel
			// closed: look again.
			select {
			case <-s.dead:
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		out := []*queue.Delivery{d.toDelivery(s, first)}
	more:
		for len(out) < max {
			select {
			case raw, ok := <-s.deliveries:
				if !ok {
					break more
				}
				out = append(out, d.toDelivery(s, raw))
			default:
				break more
			}
		}
		return out, nil
	}
}

func (d *Driver) toDelivery(s *session, raw amqp.Delivery) *queue.Delivery {
	del := &queue.Delivery{
		ID:            raw.MessageId,
		CorrelationID: raw.CorrelationId,
		ReplyTo:       raw.ReplyTo,
		ContentType:   raw.ContentType,
		Body:          raw.Body,
		Headers:       stringHeaders(raw.Headers),
		Attempt:       attempt(raw),
		EnqueuedAt:    raw.Timestamp,
		ReceivedAt:    time.Now(),
		Handle:        &handle{s: s, tag: raw.DeliveryTag, raw: raw},
	}
	return del
}

// attempt derives the 1-based attempt number: quorum queues count earlier
// failed deliveries in x-delivery-count; classic queues only say whether the
// message was delivered before. A classic queue passes a producer's own
// x-delivery-count through, so a count below zero or absurdly high is
// ignored rather than trusted (it would overflow into a negative attempt).
func attempt(raw amqp.Delivery) int {
	n := int64(-1)
	switch v := raw.Headers["x-delivery-count"].(type) {
	case int64:
		n = v
	case int32:
		n = int64(v)
	case int:
		n = int64(v)
	}
	if n >= 0 && n < math.MaxInt32 && (n > 0 || !raw.Redelivered) {
		return int(n) + 1
	}
	if raw.Redelivered {
		return 2
	}
	return 1
}

func stringHeaders(t amqp.Table) map[string]string {
	if len(t) == 0 {
		return nil
	}
	out := make(map[string]string, len(t))
	for k, v := range t {
		switch v := v.(type) {
		case string:
			out[k] = v
		case []byte:
			out[k] = string(v)
		}
	}
	return out
}

// SetPrefetch changes how many unacknowledged deliveries the broker sends
// this worker. RabbitMQ applies a new per-consumer prefetch only to new
// consumers, so the consumer is cancelled and started again; deliveries
// already sent stay valid and are returned by Receive first.
func (d *Driver) SetPrefetch(ctx context.Context, n int) error {
	if n < 1 {
		n = 1
	}
	d.mu.Lock()
	if n == d.prefetch || d.stopped || !d.cfg.Consume {
		d.prefetch = n
		d.mu.Unlock()
		return nil
	}
	d.prefetch = n
	d.mu.Unlock()
	s, err := d.current(ctx)
	if err != nil {
		return err
	}
	if err := d.cancelAndDrain(ctx, s); err != nil {
		return err
	}
	return s.consume(d.cfg.Queue, n)
}

// cancelAndDrain cancels the consumer and moves what it had buffered to
// pending.
func (d *Driver) cancelAndDrain(ctx context.Context, s *session) error {
	s.consMu.Lock()
	err := s.cons.Cancel(s.tag, false)
	s.consMu.Unlock()
	if err != nil {
		return fmt.Errorf("cancel consumer: %w", err)
	}
	for {
		select {
		case raw, ok := <-s.deliveries:
			if !ok {
				return nil
			}
			d.mu.Lock()
			d.pending = append(d.pending, raw)
			d.mu.Unlock()
		case <-s.dead:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// StopReceiving cancels the consumer and requeues every delivery the broker
// had sent but Receive had not handed out. Later calls to Receive return
// queue.ErrClosed; Publish and Settle keep working so in-flight work can
// finish.
func (d *Driver) StopReceiving(ctx context.Context) error {
	d.mu.Lock()
	if d.stopped {
		d.mu.Unlock()
		return nil
	}
	d.stopped = true
	d.mu.Unlock()
	if !d.cfg.Consume {
		return nil
	}
	d.mu.Lock()
	s := d.sess
	d.mu.Unlock()
	if s == nil {
		return nil // disconnected: the broker has requeued everything
	}
	err := d.cancelAndDrain(ctx, s)
	d.mu.Lock()
	pending := d.pending
	d.pending = nil
	d.mu.Unlock()
	s.consMu.Lock()
	defer s.consMu.Unlock()
	for _, raw := range pending {
		if nerr := s.cons.Nack(raw.DeliveryTag, false, true); nerr != nil {
			err = errors.Join(err, fmt.Errorf("requeue prefetched delivery: %w", nerr))
			break
		}
	}
	return err
}

// Publish sends m to queue m.To through the default exchange and waits for
// the broker's confirm.
func (d *Driver) Publish(ctx context.Context, m queue.Message) error {
	s, err := d.current(ctx)
	if err != nil {
		return err
	}
	return s.publish(ctx, m)
}

func (s *session) publish(ctx context.Context, m queue.Message) error {
	p := amqp.Publishing{
		ContentType:   m.ContentType,
		CorrelationId: m.CorrelationID,
		MessageId:     m.MessageID,
		ReplyTo:       m.ReplyTo,
		Body:          m.Body,
		Timestamp:     time.Now(),
	}
	if m.Persistent {
		p.DeliveryMode = amqp.Persistent
	}
	if len(m.Headers) > 0 {
		p.Headers = make(amqp.Table, len(m.Headers))
		for k, v := range m.Headers {
			p.Headers[k] = v
		}
	}
	return s.publishRaw(ctx, m.To, p)
}

func (s *session) publishRaw(ctx context.Context, to string, p amqp.Publishing) error {
	s.pubMu.Lock()
	conf, err := s.pub.PublishWithDeferredConfirmWithContext(ctx, "", to, false, false, p)
	s.pubMu.Unlock()
	if err != nil {
		return fmt.Errorf("publish to %q: %w", to, err)
	}
	select {
	case <-conf.Done():
	case <-ctx.Done():
		return fmt.Errorf("publish to %q: waiting for the broker's confirm: %w", to, ctx.Err())
	case <-s.dead:
		return fmt.Errorf("publish to %q: connection lost before the broker confirmed", to)
	}
	if !conf.Acked() {
		return fmt.Errorf("publish to %q: the broker refused the message (nack)", to)
	}
	return nil
}

// Settle acks, requeues or dead-letters del.
func (d *Driver) Settle(ctx context.Context, del *queue.Delivery, st queue.Settlement) error {
	h, ok := del.Handle.(*handle)
	if !ok {
		return fmt.Errorf("settle: delivery %q was not received by this driver", del.ID)
	}
	select {
	case <-h.s.dead:
		return fmt.Errorf("settle %s: %w", st.Action, queue.ErrStale)
	default:
	}
	var err error
	switch st.Action {
	case queue.Ack:
		err = h.s.ack(h.tag)
	case queue.Requeue:
		err = h.s.nack(h.tag, true)
	case queue.DeadLetter:
		err = d.deadLetter(ctx, h, del, st)
	default:
		return fmt.Errorf("settle: unknown action %d", st.Action)
	}
	if err != nil {
		select {
		case <-h.s.dead:
			return fmt.Errorf("settle %s: %w", st.Action, queue.ErrStale)
		default:
		}
		return fmt.Errorf("settle %s: %w", st.Action, err)
	}
	return nil
}

func (s *session) ack(tag uint64) error {
	s.consMu.Lock()
	defer s.consMu.Unlock()
	return s.cons.Ack(tag, false)
}

func (s *session) nack(tag uint64, requeue bool) error {
	s.consMu.Lock()
	defer s.consMu.Unlock()
	return s.cons.Nack(tag, false, requeue)
}

// deadLetter publishes a copy with the reason to the dead-letter queue, then
// acks the original. If the copy cannot be published the original is
// rejected without requeue, so the queue's own dead-letter target still
// catches it (without our reason headers).
func (d *Driver) deadLetter(ctx context.Context, h *handle, del *queue.Delivery, st queue.Settlement) error {
	raw := h.raw
	headers := amqp.Table{}
	for k, v := range raw.Headers {
		headers[k] = v
	}
	headers[queue.HeaderDeadLetterReason] = st.Reason
	headers[queue.HeaderDeadLetterDescription] = st.Description
	headers[queue.HeaderAttempts] = int64(del.Attempt)
	headers[queue.HeaderSourceQueue] = d.cfg.Queue
	p := amqp.Publishing{
		Headers:       headers,
		ContentType:   raw.ContentType,
		CorrelationId: raw.CorrelationId,
		MessageId:     raw.MessageId,
		ReplyTo:       raw.ReplyTo,
		Timestamp:     raw.Timestamp,
		DeliveryMode:  amqp.Persistent,
		Body:          raw.Body,
	}
	if err := h.s.publishRaw(ctx, d.cfg.DeadLetterQueue, p); err != nil {
		d.log.Error("dead-letter copy failed; rejecting to the queue's dead-letter target", "id", del.ID, "err", err)
		return h.s.nack(h.tag, false)
	}
	return h.s.ack(h.tag)
}

// Ready reports whether the broker connection is up.
func (d *Driver) Ready(context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.closed:
		return queue.ErrClosed
	case d.sess == nil:
		return errors.New("not connected to RabbitMQ (reconnecting)")
	}
	return nil
}

// Close stops the supervisor and closes the connection; unacked deliveries
// return to the queue. Safe to call twice.
func (d *Driver) Close() error {
	d.closeO.Do(func() {
		d.mu.Lock()
		d.closed = true
		s := d.sess
		d.mu.Unlock()
		d.stop()
		<-d.done
		if s != nil {
			_ = s.conn.Close()
		}
	})
	return nil
}
