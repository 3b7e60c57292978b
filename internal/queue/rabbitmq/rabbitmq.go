package rabbitmq

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"golang.org/x/sync/errgroup"

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
	// arguments are used as they are. A dead-letter that finds
	// DeadLetterQueue missing declares it again and is sent once more.
	Declare bool
	// ExtraQueues are declared too (the results queue).
	ExtraQueues []string
	// DeliveryLimit is the broker-side backstop (x-delivery-limit) after which
	// the broker itself dead-letters a message; 0 sets none.
	DeliveryLimit int
	// Prefetch is the initial consumer prefetch; SetPrefetch changes it.
	// 1 to MaxPrefetch; a larger value is clamped, with a log line.
	Prefetch int
	// ConnectionName shows in the management UI.
	ConnectionName string
	// ReconnectMin and ReconnectMax bound the reconnect backoff
	// (defaults 250ms and 15s).
	ReconnectMin, ReconnectMax time.Duration
	// Heartbeat is the AMQP heartbeat interval; a dead link is noticed after
	// about three missed beats (default 10s).
	Heartbeat time.Duration
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

	// consumerMu gives the consumer's lifecycle one owner at a time: every
	// start (consume) and stop (cancel) of a session's consumer happens
	// under it, after reading paused and stopped under it. So a Pause or
	// StopReceiving cannot fall between the two halves of a restart (the
	// cancel and the new consume) and leave a consumer live on a paused
	// driver, whose deliveries a later consumer would orphan and its
	// multiple acks cover, unread. Order: consumerMu, then consMu or
	// readMu, then mu.
	consumerMu sync.Mutex

	mu       sync.Mutex
	sess     *session      // nil while disconnected
	ready    chan struct{} // closed when sess is set; replaced on loss
	prefetch int
	stopped  bool // StopReceiving was called
	paused   bool // Pause was called, and Resume not yet
	closed   bool

	pending []pendingDelivery // drained from a cancelled consumer, still valid

	// The receive goroutine's own state (Receive, SetPrefetch).
	desired     int           // prefetch asked for by SetPrefetch
	reconsumed  time.Time     // last consumer restart for a prefetch change
	reconsume   time.Duration // least time between restarts (minReconsume)
	onRestart   func()        // tests: runs between the halves of a restart
	consumeLost error         // set while the broker has cancelled the consumer

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
	consMu     sync.Mutex           // serialises ack/nack/qos on cons
	deliveries <-chan amqp.Delivery // written under Driver.consumerMu; read by the receive goroutine
	tag        string               // guarded by Driver.consumerMu
	consuming  bool                 // a consumer was started and not cancelled by us; guarded by Driver.consumerMu
	cancelled  atomic.Bool          // the broker cancelled the consumer
	acker      *acker               // coalesces acks (acks.go)
	readMu     sync.Mutex           // held while reading deliveries and tracking their tags
	dead       chan struct{}        // closed when the connection or a channel closes

	ret returns // matches basic.returns to publishes (returns.go)

	tables sync.Pool // of amqp.Table: publish's header tables, recycled (see table)
}

type handle struct {
	s   *session
	tag uint64
	raw amqp.Delivery
}

type pendingDelivery struct {
	s   *session
	raw amqp.Delivery
}

// directReplyTo prefixes RabbitMQ's direct reply-to addresses.
const directReplyTo = "amq.rabbitmq.reply-to"

// publishIDHeader tagged each publish, up to v0.x, so a basic.return could
// be matched to it (returns.go does without it now). Copies leave it out,
// since requests published by then may still carry it.
const publishIDHeader = "x-sous-publish-id"

// MaxPrefetch is the largest prefetch AMQP 0-9-1 can carry: basic.qos's
// prefetch-count is 16 bits. amqp091-go's Qos takes an int and casts it, so
// 65,536 would go out as 0, which RabbitMQ reads as unlimited.
const MaxPrefetch = math.MaxUint16

// clampPrefetch bounds n to 1..MaxPrefetch; it logs when n was above.
func (d *Driver) clampPrefetch(n int) int {
	if n > MaxPrefetch {
		d.log.Warn("prefetch above the AMQP limit; using the limit", "asked", n, "prefetch", MaxPrefetch)
		return MaxPrefetch
	}
	return max(n, 1)
}

// minReconsume spaces consumer restarts for prefetch changes: each restart
// lets the broker send a fresh window while the old one is still held.
const minReconsume = 5 * time.Second

// ErrAccessRefused is returned by Open when RabbitMQ refuses access at
// start: the user name or password (403 ACCESS_REFUSED, amqp091-go's
// ErrCredentials), the vhost (ErrVhost, 530 NOT_ALLOWED), or the user's
// permissions on the queues. That is configuration, which retrying does not
// fix. After a good start the driver keeps retrying a refusal, which may
// heal (a password being rotated).
var ErrAccessRefused = errors.New("RabbitMQ refused access")

// refused reports whether err is the broker refusing access.
func refused(err error) bool {
	var aerr *amqp.Error
	return errors.As(err, &aerr) && (aerr.Code == amqp.AccessRefused || aerr.Code == amqp.NotAllowed)
}

// Open connects (retrying until ctx is done) and starts the supervisor. An
// access refusal is not retried: Open returns an error wrapping
// ErrAccessRefused.
func Open(ctx context.Context, cfg Config, log *slog.Logger) (*Driver, error) {
	if cfg.ReconnectMin <= 0 {
		cfg.ReconnectMin = 250 * time.Millisecond
	}
	if cfg.ReconnectMax <= 0 {
		cfg.ReconnectMax = 15 * time.Second
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 10 * time.Second
	}
	d := &Driver{cfg: cfg, log: log.With("broker", "rabbitmq", "queue", cfg.Queue), ready: make(chan struct{}), done: make(chan struct{}), reconsume: minReconsume}
	d.cfg.Prefetch = d.clampPrefetch(cfg.Prefetch)
	d.prefetch, d.desired = d.cfg.Prefetch, d.cfg.Prefetch
	s, err := d.connect(ctx, true)
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
		d.reconsumed = time.Time{}
		d.mu.Unlock()
		d.log.Warn("broker connection lost; reconnecting")
		next, err := d.connect(ctx, false)
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

// connect dials until it succeeds or ctx is done. At start (first) an
// access refusal ends it: see ErrAccessRefused.
func (d *Driver) connect(ctx context.Context, first bool) (*session, error) {
	wait := d.cfg.ReconnectMin
	for attempt := 1; ; attempt++ {
		s, err := d.dial(ctx)
		if err == nil {
			return s, nil
		}
		if first && refused(err) {
			return nil, fmt.Errorf("%w: %v. Check the user name, password and vhost in the broker URL, and that the user may configure, "+
				"write and read the queues (rabbitmqctl list_permissions); not retrying", ErrAccessRefused, err)
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
		Heartbeat:       d.cfg.Heartbeat,
		TLSClientConfig: d.cfg.TLS,
		Properties:      amqp.Table{"connection_name": d.cfg.ConnectionName},
		Dial: func(network, addr string) (net.Conn, error) {
			c, err := dialer(network, addr)
			if err != nil {
				return nil, err
			}
			return newCoalescingConn(c), nil
		},
	})
	if err != nil {
		se := &scrubbedError{msg: fmt.Sprintf("dial %s: %s", secret.URL(d.cfg.URL.Reveal()), secret.Scrub(err.Error(), d.cfg.URL))}
		errors.As(err, &se.amqpErr)
		return nil, se
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
	s = &session{conn: conn, dead: make(chan struct{}), acker: newAcker()}
	if s.pub, err = conn.Channel(); err != nil {
		return nil, fmt.Errorf("open publish channel: %w", err)
	}
	if err := s.pub.Confirm(false); err != nil {
		return nil, fmt.Errorf("enable publisher confirms: %w", err)
	}
	if s.cons, err = conn.Channel(); err != nil {
		return nil, fmt.Errorf("open consume channel: %w", err)
	}
	// A session is not yet visible to Pause: one that pauses meanwhile
	// finds this consumer live on the next Receive (stopPaused).
	d.consumerMu.Lock()
	d.mu.Lock()
	consume := d.cfg.Consume && !d.stopped && !d.paused
	prefetch := d.prefetch
	d.mu.Unlock()
	var cerr error
	if consume {
		cerr = s.consume(d.cfg.Queue, prefetch)
	}
	d.consumerMu.Unlock()
	if cerr != nil {
		return nil, cerr
	}
	// Every notification channel is buffered and drained (amqp091-go's
	// best practice): an undrained one would deadlock the connection.
	connClosed := conn.NotifyClose(make(chan *amqp.Error, 1))
	pubClosed := s.pub.NotifyClose(make(chan *amqp.Error, 1))
	consClosed := s.cons.NotifyClose(make(chan *amqp.Error, 1))
	blocked := conn.NotifyBlocked(make(chan amqp.Blocking, 4))
	// Buffered and read only by non-blocking drains: returns.go says why.
	s.ret.ch = s.pub.NotifyReturn(make(chan amqp.Return, returnBuffer))
	cancels := s.cons.NotifyCancel(make(chan string, 4))
	go s.ret.poll(s.dead)
	go s.ackLoop()
	go func() {
		for tag := range cancels {
			d.log.Warn("the broker cancelled the consumer (queue deleted?); consuming again", "consumer", tag)
			s.cancelled.Store(true)
		}
	}()
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

// consume starts a consumer; the caller holds Driver.consumerMu and has
// checked that the driver is neither paused nor stopped.
func (s *session) consume(queueName string, prefetch int) error {
	s.consMu.Lock()
	defer s.consMu.Unlock()
	if err := s.cons.Qos(prefetch, 0, false); err != nil {
		return fmt.Errorf("set prefetch %d: %w", prefetch, err)
	}
	s.acker.setWindow(prefetch)
	s.tag = "sous-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	dl, err := s.cons.Consume(queueName, s.tag, false, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume from queue %q: %w", queueName, err)
	}
	s.deliveries = dl
	s.consuming = true
	s.cancelled.Store(false)
	return nil
}

// scrubbedError is a dial error whose text has the URL's secrets taken
// out. It unwraps only to the broker's *amqp.Error, if there is one (for
// refused): other errors in the chain may quote the URL (url.Parse does).
type scrubbedError struct {
	msg     string
	amqpErr *amqp.Error
}

func (e *scrubbedError) Error() string { return e.msg }

func (e *scrubbedError) Unwrap() error {
	if e.amqpErr == nil {
		return nil
	}
	return e.amqpErr
}

// declare declares the topology, tolerating queues that already exist with
// other arguments.
func (d *Driver) declare(conn *amqp.Connection) error {
	if d.cfg.Queue == "" {
		if err := declareQueue(conn, d.cfg.DeadLetterQueue, deadLetterArgs(), d.log); err != nil {
			return err
		}
	} else if err := DeclareRequestQueue(conn, d.cfg.Queue, d.cfg.DeadLetterQueue, d.cfg.DeliveryLimit, d.log); err != nil {
		return err
	}
	for _, name := range d.cfg.ExtraQueues {
		if err := declareQueue(conn, name, amqp.Table{"x-queue-type": "quorum"}, d.log); err != nil {
			return err
		}
	}
	return nil
}

// DeclareRequestQueue declares the dead-letter queue and then the request
// queue as the worker does with Declare: durable quorum queues, the
// request queue dead-lettering to deadLetterQueue after deliveryLimit
// deliveries (0: no x-delivery-limit). The gateway declares with it too,
// so that the arguments of the two cannot drift apart (RabbitMQ refuses a
// declare whose arguments differ from the queue's, PRECONDITION_FAILED).
// A queue that exists with other arguments is used as it is, with a
// warning on log. It opens a channel of its own per queue and
// closes it; conn stays open.
func DeclareRequestQueue(conn *amqp.Connection, queue, deadLetterQueue string, deliveryLimit int, log *slog.Logger) error {
	if err := declareQueue(conn, deadLetterQueue, deadLetterArgs(), log); err != nil {
		return err
	}
	return declareQueue(conn, queue, requestQueueArgs(deadLetterQueue, deliveryLimit), log)
}

// requestQueueArgs are the request queue's arguments: see DeclareRequestQueue.
func requestQueueArgs(deadLetterQueue string, deliveryLimit int) amqp.Table {
	args := amqp.Table{"x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": deadLetterQueue}
	if deliveryLimit > 0 {
		args["x-delivery-limit"] = int64(deliveryLimit)
	}
	return args
}

func deadLetterArgs() amqp.Table { return amqp.Table{"x-queue-type": "quorum"} }

// declareQueue declares one durable queue on a channel of its own (a
// refusal closes the channel), using an existing queue with other
// arguments as it is.
func declareQueue(conn *amqp.Connection, name string, args amqp.Table, log *slog.Logger) error {
	if name == "" {
		return nil
	}
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel to declare %q: %w", name, err)
	}
	_, err = ch.QueueDeclare(name, true, false, false, false, args)
	var aerr *amqp.Error
	if errors.As(err, &aerr) && aerr.Code == amqp.PreconditionFailed {
		// The queue exists with other arguments (a classic queue, say):
		// use it as it is rather than refuse to start.
		log.Warn("queue exists with other arguments; using it as it is", "name", name, "detail", aerr.Reason)
		if ch, err = conn.Channel(); err != nil {
			return fmt.Errorf("open channel to check %q: %w", name, err)
		}
		_, err = ch.QueueDeclarePassive(name, true, false, false, false, nil)
	}
	if err != nil {
		return fmt.Errorf("declare queue %q: %w", name, err)
	}
	_ = ch.Close()
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
		stopped, paused := d.stopped, d.paused
		var out []*queue.Delivery
		for len(d.pending) > 0 && len(out) < max {
			p := d.pending[0]
			d.pending = d.pending[1:]
			select {
			case <-p.s.dead: // its channel is gone: the broker redelivers it
			default:
				out = append(out, d.toDelivery(p.s, p.raw))
			}
		}
		d.mu.Unlock()
		if len(out) > 0 {
			return out, nil
		}
		if stopped {
			return nil, queue.ErrClosed
		}
		if paused {
			if err := d.stopPaused(ctx); err != nil && ctx.Err() == nil {
				d.log.Warn("stop the consumer while paused", "err", err)
			}
			select { // the caller is told nothing: Resume restarts the consumer
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		s, err := d.current(ctx)
		if err != nil {
			return nil, err
		}
		if err := d.maintainConsumer(ctx, s); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if errors.Is(err, errNoConsumer) {
				continue // paused or stopped meanwhile: the loop's top says which
			}
			select { // the queue may be gone: retry, and say so in Ready
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-s.dead:
			case <-time.After(time.Second):
			}
			continue
		}
		d.mu.Lock()
		moved := len(d.pending) > 0 // a consumer restart moved deliveries
		d.mu.Unlock()
		if moved {
			continue
		}
		// Reading a delivery and tracking its tag happen under readMu, so
		// that tags are tracked in the order they arrive even when Pause
		// drains the consumer meanwhile (acks.go).
		var first amqp.Delivery
		var ok bool
		s.readMu.Lock()
		select {
		case <-ctx.Done():
			s.readMu.Unlock()
			return nil, ctx.Err()
		case <-s.dead:
			s.readMu.Unlock()
			continue
		case first, ok = <-s.deliveries:
			if ok {
				s.acker.track(first.DeliveryTag)
			}
		}
		if !ok {
			s.readMu.Unlock()
			// The broker cancelled the consumer, or the channel closed:
			// maintainConsumer sorts it out on the next pass.
			select {
			case <-s.dead:
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		out = append(out, d.toDelivery(s, first))
	more:
		for len(out) < max {
			select {
			case raw, ok := <-s.deliveries:
				if !ok {
					break more
				}
				s.acker.track(raw.DeliveryTag)
				out = append(out, d.toDelivery(s, raw))
			default:
				break more
			}
		}
		s.readMu.Unlock()
		return out, nil
	}
}

// errNoConsumer: the driver was paused or stopped, so maintainConsumer
// started no consumer.
var errNoConsumer = errors.New("paused or stopped: no consumer")

// maintainConsumer starts the consumer when there is none (the broker
// cancelled it, or Resume followed Pause), and applies a prefetch change
// when it is safe: nothing from the old consumer is pending and the last
// restart was a while ago, so prefetch changes never pile up windows of
// unacknowledged messages. It holds consumerMu throughout: a restart is
// one step for Pause and StopReceiving.
func (d *Driver) maintainConsumer(ctx context.Context, s *session) error {
	d.consumerMu.Lock()
	defer d.consumerMu.Unlock()
	d.mu.Lock()
	n, paused, stopped := d.prefetch, d.paused, d.stopped
	d.mu.Unlock()
	if paused || stopped {
		return errNoConsumer
	}
	if s.cancelled.Load() || !s.consuming {
		if err := s.consume(d.cfg.Queue, n); err != nil {
			d.setConsumeLost(fmt.Errorf("consume from queue %q (after the broker cancelled the consumer, or a pause): %w", d.cfg.Queue, err))
			return err
		}
		d.setConsumeLost(nil)
		return nil
	}
	d.mu.Lock()
	want, have, pending, last := d.desired, d.prefetch, len(d.pending), d.reconsumed
	d.mu.Unlock()
	if want == have || pending > 0 || time.Since(last) < d.reconsume {
		return nil
	}
	if err := d.cancelAndDrain(ctx, s); err != nil {
		return err
	}
	if d.onRestart != nil {
		d.onRestart()
	}
	if err := s.consume(d.cfg.Queue, want); err != nil {
		return err
	}
	d.mu.Lock()
	d.prefetch, d.reconsumed = want, time.Now()
	d.mu.Unlock()
	return nil
}

// stopPaused stops a consumer that a session started while the driver was
// being paused (before Pause could see the session), and hands back what
// it had sent.
func (d *Driver) stopPaused(ctx context.Context) error {
	d.consumerMu.Lock()
	d.mu.Lock()
	s, paused := d.sess, d.paused
	d.mu.Unlock()
	if s == nil || !paused || !s.consuming {
		d.consumerMu.Unlock()
		return nil
	}
	err := d.cancelAndDrain(ctx, s)
	d.consumerMu.Unlock()
	return errors.Join(err, d.handBack(ctx, d.takePending()))
}

func (d *Driver) takePending() []pendingDelivery {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.pending
	d.pending = nil
	return p
}

func (d *Driver) setConsumeLost(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.consumeLost = err
}

// received is a delivery with its handle, in one allocation.
type received struct {
	del queue.Delivery
	h   handle
}

func (d *Driver) toDelivery(s *session, raw amqp.Delivery) *queue.Delivery {
	r := &received{h: handle{s: s, tag: raw.DeliveryTag, raw: raw}}
	r.del = queue.Delivery{
		ID:                 raw.MessageId,
		CorrelationID:      raw.CorrelationId,
		ReplyTo:            raw.ReplyTo,
		ContentType:        raw.ContentType,
		Body:               raw.Body,
		Headers:            stringHeaders(raw.Headers),
		Attempt:            attempt(raw),
		EnqueuedAt:         enqueuedAt(raw),
		EnqueuedResolution: enqueuedResolution(raw),
		ReceivedAt:         time.Now(),
		Handle:             &r.h,
	}
	return &r.del
}

// enqueuedAt is when the message was published: the timestamp_in_ms
// header where there is one (milliseconds since the epoch, as RabbitMQ's
// message-timestamp plugin and sousctl set it), else the AMQP timestamp
// property, which has whole seconds only.
func enqueuedAt(raw amqp.Delivery) time.Time {
	if ms := headerMillis(raw.Headers["timestamp_in_ms"]); ms > 0 {
		return time.UnixMilli(ms)
	}
	return raw.Timestamp
}

// enqueuedResolution is how precise enqueuedAt is: milliseconds from
// timestamp_in_ms, whole seconds from the AMQP timestamp property.
func enqueuedResolution(raw amqp.Delivery) time.Duration {
	switch {
	case headerMillis(raw.Headers["timestamp_in_ms"]) > 0:
		return time.Millisecond
	case !raw.Timestamp.IsZero():
		return time.Second
	}
	return 0
}

func headerMillis(v any) int64 {
	switch v := v.(type) {
	case int64:
		return v
	case int32:
		return int64(v)
	case int:
		return int64(v)
	}
	return 0
}

// attempt derives the 1-based attempt number: the attempts counted by
// earlier requeues (x-sous-attempts, set by this driver's Requeue), plus the
// broker's count of failed deliveries of this copy (quorum queues'
// x-delivery-count; on classic queues only the redelivered flag), plus one.
// Header values outside [0, MaxInt32) are ignored: a classic queue passes a
// producer's headers through untouched.
func attempt(raw amqp.Delivery) int {
	counted := headerCount(raw.Headers[queue.HeaderAttempts])
	failed := headerCount(raw.Headers["x-delivery-count"])
	if failed == 0 && raw.Redelivered {
		failed = 1
	}
	return int(min(counted+failed+1, math.MaxInt32))
}

func headerCount(v any) int64 {
	var n int64
	switch v := v.(type) {
	case int64:
		n = v
	case int32:
		n = int64(v)
	case int:
		n = int64(v)
	default:
		return 0
	}
	if n < 0 || n >= math.MaxInt32 {
		return 0
	}
	return n
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

// SetPrefetch asks for a new consumer prefetch, at most MaxPrefetch (a
// larger n is clamped, with a log line the first time). RabbitMQ applies a
// per-consumer prefetch only to new consumers, so the consumer is restarted
// by Receive once nothing from the old one is pending, at most every few
// seconds; deliveries already sent stay valid.
func (d *Driver) SetPrefetch(_ context.Context, n int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if n > MaxPrefetch && d.desired == MaxPrefetch {
		n = MaxPrefetch // clamped and logged already
	}
	d.desired = d.clampPrefetch(n)
	return nil
}

// cancelAndDrain cancels the consumer and moves what it had buffered to
// pending. The caller holds consumerMu.
func (d *Driver) cancelAndDrain(ctx context.Context, s *session) error {
	if !s.consuming {
		return nil // none started, or cancelled already
	}
	s.consMu.Lock()
	err := s.cons.Cancel(s.tag, false)
	s.consMu.Unlock()
	if err != nil {
		return fmt.Errorf("cancel consumer: %w", err)
	}
	s.consuming = false
	s.readMu.Lock()
	defer s.readMu.Unlock()
	for {
		select {
		case raw, ok := <-s.deliveries:
			if !ok {
				return nil
			}
			s.acker.track(raw.DeliveryTag)
			d.mu.Lock()
			d.pending = append(d.pending, pendingDelivery{s, raw})
			d.mu.Unlock()
		case <-s.dead:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// StopReceiving cancels the consumer and requeues every delivery the broker
// had sent but Receive had not handed out (see handBack). Later calls to
// Receive return queue.ErrClosed; Publish and Settle keep working so
// in-flight work can finish.
func (d *Driver) StopReceiving(ctx context.Context) error {
	d.consumerMu.Lock()
	d.mu.Lock()
	if d.stopped {
		d.mu.Unlock()
		d.consumerMu.Unlock()
		return nil
	}
	d.stopped = true
	s := d.sess
	d.mu.Unlock()
	if !d.cfg.Consume || s == nil { // disconnected: the broker has requeued everything
		d.consumerMu.Unlock()
		return nil
	}
	err := d.cancelAndDrain(ctx, s)
	d.consumerMu.Unlock()
	if err != nil {
		d.log.Warn("could not stop the consumer cleanly; what it still buffers goes back to the queue when the connection closes", "err", err)
	}
	return errors.Join(err, d.handBack(ctx, d.takePending()))
}

// handBackParallel bounds the hand-backs in flight at shutdown.
const handBackParallel = 64

// handBack returns prefetched deliveries to the queue without spending an
// attempt: a copy with the attempts made so far, then an ack, as Requeue
// with queue.ReasonShutdown does. The copies are published concurrently
// (handBackParallel at a time), so their confirms overlap: the whole window
// takes about one round trip to the broker, not one per delivery. A
// delivery whose copy cannot be published by ctx's end is nacked back
// instead (quorum queues then count a failed delivery; if the copy was
// sent and only its confirm was late, the request is in the queue twice,
// and is answered twice). One whose channel is gone goes back when the
// connection closes. One line logs the outcome.
func (d *Driver) handBack(ctx context.Context, pending []pendingDelivery) error {
	if len(pending) == 0 {
		return nil
	}
	began := time.Now()
	var copied, nacked, left atomic.Int64
	var g errgroup.Group
	g.SetLimit(handBackParallel)
	for _, p := range pending {
		g.Go(func() error {
			select {
			case <-p.s.dead:
				left.Add(1) // the broker requeued it with its channel
				return nil
			default:
			}
			if ctx.Err() == nil {
				cp := copyOf(p.raw, amqp.Table{queue.HeaderAttempts: int64(max(0, attempt(p.raw)-1))})
				if err := p.s.publishRaw(ctx, d.cfg.Queue, cp); err == nil {
					if err := p.s.ack(p.raw.DeliveryTag); err != nil {
						// The copy is in the queue; the original comes back
						// when the channel closes.
						left.Add(1)
						return fmt.Errorf("ack a prefetched delivery after its copy: %w", err)
					}
					copied.Add(1)
					return nil
				}
			}
			if err := p.s.nack(p.raw.DeliveryTag, true); err != nil {
				left.Add(1)
				return fmt.Errorf("hand back a prefetched delivery: %w", err)
			}
			nacked.Add(1)
			return nil
		})
	}
	err := g.Wait()
	attrs := []any{"prefetched", len(pending), "copied", copied.Load(), "nacked_back", nacked.Load(), "left_to_the_broker", left.Load(), "took", time.Since(began).Round(time.Millisecond)}
	if nacked.Load() > 0 || left.Load() > 0 {
		d.log.Warn("handed back prefetched deliveries; some not as copies: those nacked back count a failed delivery on quorum queues, "+
			"and the rest go back to the queue when the connection closes", attrs...)
	} else {
		d.log.Info("handed back prefetched deliveries", attrs...)
	}
	return err
}

// Pause stops the broker sending: it cancels the consumer and hands back,
// with no attempt counted, what the broker had sent and Receive had not
// handed out. The worker calls it while its engine is down, so requests
// wait in the queue for a healthy worker. Receive returns nothing until
// Resume; Publish and Settle keep working.
func (d *Driver) Pause(ctx context.Context) error {
	d.consumerMu.Lock()
	d.mu.Lock()
	if d.paused || d.stopped || !d.cfg.Consume {
		d.mu.Unlock()
		d.consumerMu.Unlock()
		return nil
	}
	d.paused = true
	s := d.sess
	d.mu.Unlock()
	if s == nil { // disconnected: the broker has requeued everything
		d.consumerMu.Unlock()
		return nil
	}
	err := d.cancelAndDrain(ctx, s) // Receive consumes again after Resume
	d.consumerMu.Unlock()
	return errors.Join(err, d.handBack(ctx, d.takePending()))
}

// Resume undoes Pause: the next Receive consumes again.
func (d *Driver) Resume(context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.paused = false
	return nil
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
		t := s.table(m.Headers)
		defer s.tables.Put(t)
		p.Headers = t
	}
	return s.publishRaw(ctx, m.To, p)
}

// table returns a header table holding exactly h, recycled: amqp091-go has
// written a publish's frames by the time its Publish returns, so the table
// can carry a later publish's headers (the caller puts it back in
// s.tables). A value the table already holds is kept, so a header that
// repeats, as a result's status does, is not allocated again.
func (s *session) table(h map[string]string) amqp.Table {
	t, _ := s.tables.Get().(amqp.Table)
	if t == nil {
		return tableOf(h)
	}
	for k, old := range t {
		if v, ok := h[k]; !ok {
			delete(t, k)
		} else if o, _ := old.(string); o != v {
			t[k] = v
		}
	}
	for k, v := range h {
		if _, ok := t[k]; !ok {
			t[k] = v
		}
	}
	return t
}

func tableOf(h map[string]string) amqp.Table {
	t := make(amqp.Table, len(h))
	for k, v := range h {
		t[k] = v
	}
	return t
}

func (s *session) publishRaw(ctx context.Context, to string, p amqp.Publishing) error {
	for _, f := range [...]struct{ name, v string }{{"queue name", to}, {"message_id", p.MessageId}, {"correlation_id", p.CorrelationId}, {"reply_to", p.ReplyTo}} {
		if len(f.v) > 255 {
			// AMQP short strings end at 255 bytes; amqp091-go would close the
			// channel over it, taking every delivery in flight with it.
			return fmt.Errorf("publish to %q: %s is %d bytes, AMQP allows 255", truncate(to), f.name, len(f.v))
		}
	}
	// Direct reply-to is no queue: RabbitMQ (3.10, seen here) delivers a
	// mandatory message to it AND returns it as NO_ROUTE. A requester that
	// left takes its reply channel with it; there is nothing to check.
	mandatory := !strings.HasPrefix(to, directReplyTo)
	mark := s.ret.mark()
	// amqp091-go serialises publishes on a channel itself (Channel.m), the
	// confirm sequence number with them.
	conf, err := s.pub.PublishWithDeferredConfirmWithContext(ctx, "", to, mandatory, false, p)
	if err != nil {
		return fmt.Errorf("publish to %q: %w", truncate(to), err)
	}
	select {
	case <-conf.Done():
	case <-ctx.Done():
		return fmt.Errorf("publish to %q: waiting for the broker's confirm: %w", truncate(to), ctx.Err())
	case <-s.dead:
		return fmt.Errorf("publish to %q: connection lost before the broker confirmed", truncate(to))
	}
	if !conf.Acked() {
		return fmt.Errorf("publish to %q: the broker refused the message (nack)", truncate(to))
	}
	// A mandatory message with no queue comes back as basic.return before
	// its ack (returns.go).
	if !mandatory {
		return nil
	}
	if text, returned := s.ret.find(mark, to, &p); returned {
		return fmt.Errorf("publish to %q: %w (%s): declare the queue, or check its name", truncate(to), queue.ErrUnroutable, text)
	}
	return nil
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
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
		err = d.requeue(ctx, h.s, h.raw, del.Attempt, st)
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

// Stale reports whether del came from a session that is gone: its
// connection or a channel closed, so it can no longer be acked and the
// broker redelivers it on the next session. The worker then publishes no
// result for it, which the redelivered copy would duplicate. False for a
// delivery this driver did not produce.
func (d *Driver) Stale(del *queue.Delivery) bool {
	h, ok := del.Handle.(*handle)
	if !ok {
		return false
	}
	select {
	case <-h.s.dead:
		return true
	default:
		return false
	}
}

// copyOf is raw as a new persistent message with extra headers. UserId is
// left out: the broker checks it against the connection's user.
func copyOf(raw amqp.Delivery, extra amqp.Table) amqp.Publishing {
	headers := amqp.Table{}
	for k, v := range raw.Headers {
		if k != "x-delivery-count" && k != publishIDHeader {
			headers[k] = v
		}
	}
	for k, v := range extra {
		headers[k] = v
	}
	return amqp.Publishing{
		Headers:         headers,
		ContentType:     raw.ContentType,
		ContentEncoding: raw.ContentEncoding,
		CorrelationId:   raw.CorrelationId,
		MessageId:       raw.MessageId,
		ReplyTo:         raw.ReplyTo,
		Timestamp:       raw.Timestamp,
		Type:            raw.Type,
		AppId:           raw.AppId,
		Priority:        raw.Priority,
		DeliveryMode:    amqp.Persistent,
		Body:            raw.Body,
	}
}

// requeue puts a copy at the back of the input queue with the attempts made
// so far (one fewer when the worker is only shutting down), then acks the
// original. If the copy cannot be published the original is nacked back
// instead, which also requeues it (a quorum queue then counts a failed
// delivery).
func (d *Driver) requeue(ctx context.Context, s *session, raw amqp.Delivery, attempt int, st queue.Settlement) error {
	counted := attempt
	if !queue.Counts(st.Reason) {
		counted--
	}
	extra := amqp.Table{queue.HeaderAttempts: int64(max(0, counted))}
	for k, v := range st.Headers {
		extra[k] = v
	}
	p := copyOf(raw, extra)
	if err := s.publishRaw(ctx, d.cfg.Queue, p); err != nil {
		d.log.Warn("requeue copy failed; nacking the delivery back instead", "id", raw.MessageId, "err", err)
		return s.nack(raw.DeliveryTag, true)
	}
	return s.ack(raw.DeliveryTag)
}

// deadLetter publishes a copy with the reason to the dead-letter queue, then
// acks the original. With Declare, a dead-letter queue found missing is
// declared again and the copy sent once more. If the copy cannot be published it returns the error
// and leaves the delivery unsettled, so the caller requeues it: an existing
// queue may have no dead-letter target of its own, and a reject would drop
// the message there.
func (d *Driver) deadLetter(ctx context.Context, h *handle, del *queue.Delivery, st queue.Settlement) error {
	p := copyOf(h.raw, amqp.Table{
		queue.HeaderDeadLetterReason:      st.Reason,
		queue.HeaderDeadLetterDescription: st.Description,
		queue.HeaderAttempts:              int64(del.Attempt),
		queue.HeaderSourceQueue:           d.cfg.Queue,
	})
	err := h.s.publishRaw(ctx, d.cfg.DeadLetterQueue, p)
	if errors.Is(err, queue.ErrUnroutable) && d.cfg.Declare {
		// The dead-letter queue is gone (deleted by hand, say): this driver
		// declares the topology, so it declares the queue again rather
		// than keep requests it cannot dead-letter.
		if derr := declareQueue(h.s.conn, d.cfg.DeadLetterQueue, deadLetterArgs(), d.log); derr != nil {
			return fmt.Errorf("dead-letter copy to %q: %w; declaring it again: %v", d.cfg.DeadLetterQueue, err, derr)
		}
		d.log.Warn("the dead-letter queue was missing; declared it again", "dead_letter_queue", d.cfg.DeadLetterQueue)
		err = h.s.publishRaw(ctx, d.cfg.DeadLetterQueue, p)
	}
	if err != nil {
		return fmt.Errorf("dead-letter copy to %q: %w", d.cfg.DeadLetterQueue, err)
	}
	return h.s.ack(h.tag)
}

// nack sends a nack for tag alone, then lets the ack run pass it.
func (s *session) nack(tag uint64, requeue bool) error {
	s.consMu.Lock()
	err := s.cons.Nack(tag, false, requeue)
	s.consMu.Unlock()
	if err == nil {
		s.acker.settled(tag)
	}
	return err
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
	case d.consumeLost != nil:
		return d.consumeLost
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
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			s.flushAcks(ctx) // the held acks, before the connection goes
			cancel()
			_ = s.conn.Close()
		}
	})
	return nil
}
