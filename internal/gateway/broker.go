package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/wire"
)

// Broker is what the server needs from the message broker.
type Broker interface {
	// Send publishes m persistently and returns once the broker has
	// confirmed it, with the Call on which its chunks and result arrive.
	// Errors: ErrQueueFull, ErrNoQueue, ErrUnavailable (wrapped).
	Send(ctx context.Context, m Message) (Call, error)
	// Ready reports whether requests can be sent now.
	Ready(ctx context.Context) error
}

// Call is one request's way back. Replies arrive in order.
type Call interface {
	// Notify receives a value when Take may return something new.
	Notify() <-chan struct{}
	// Take returns the replies that arrived since the last Take, and a
	// non-nil error once no more can arrive (the connection was lost).
	Take() ([]Reply, error)
	// Close stops routing replies to the call; later ones are dropped. Safe
	// to call more than once.
	Close()
}

// Message is a request to publish.
type Message struct {
	ID string
	// Queue is the request queue it goes to (its lane's); empty: the
	// broker's configured Queue.
	Queue   string
	Body    []byte
	Headers map[string]string
	// ReplyTo is the queue its result goes to; empty: the sender's own
	// reply address (direct reply-to), for a Call to wait on.
	ReplyTo string
}

// Reply is a chunk or the result of a request.
type Reply struct {
	Chunk bool // header x-sous-status: chunk
	Body  []byte
}

var (
	// ErrQueueFull: the broker refused the request (a nack: a max-length
	// queue with overflow reject-publish).
	ErrQueueFull = errors.New("the broker refused the request: the queue is full")
	// ErrNoQueue: the request queue does not exist.
	ErrNoQueue = errors.New("the request queue does not exist")
	// ErrUnavailable: no connection to the broker.
	ErrUnavailable = errors.New("the broker is unavailable")
	// ErrAccessRefused: at start, RabbitMQ refused the login (403
	// ACCESS_REFUSED: the user name or password, or the vhost; 530
	// NOT_ALLOWED). That is configuration, which retrying does not fix, so
	// OpenAMQP returns it at once, as the worker's driver does. After a
	// good start a refusal is retried: it may heal (a password being
	// rotated).
	ErrAccessRefused = errors.New("RabbitMQ refused access")
	// ErrBlocked: the broker blocks publishing (a memory or disk alarm:
	// RabbitMQ's connection.blocked); requests fail at once until it
	// unblocks, and Ready reports it.
	ErrBlocked = errors.New("the broker blocks publishing (a resource alarm)")
)

// AMQPConfig configures an AMQP broker.
type AMQPConfig struct {
	URL secret.Value
	TLS *tls.Config // amqps; nil: system roots
	// Queue is where a Message that names no queue goes.
	Queue          string
	Channels       int           // reply-to channels (default 4)
	Heartbeat      time.Duration // default 10s
	ConnectionName string
	ReconnectMin   time.Duration // default 250ms
	ReconnectMax   time.Duration // default 15s
	// Declare makes each connect declare Queue and DeadLetterQueue as the
	// worker does (rabbitmq.DeclareRequestQueue, with DeliveryLimit), so
	// that requests can be queued, and counted by an autoscaler, before
	// any worker has started. Existing queues are used as they are.
	Declare         bool
	DeadLetterQueue string
	DeliveryLimit   int
	// Lanes are the lanes' request queues, each with its dead-letter
	// queue (SOUS_GATEWAY_LANES): with Declare each is declared, instead
	// of Queue and DeadLetterQueue.
	Lanes []LaneQueue
	// BatchResults is the durable queue where workers send the results
	// of batch lines (the Batch API): every gateway replica consumes it,
	// so any replica records any result. Empty: not consumed. It is
	// declared at each connect (a quorum queue), whatever Declare says:
	// it is the gateway's own.
	BatchResults string
	// BatchPrefetch bounds the batch results a replica holds unacked
	// (default 256).
	BatchPrefetch int
}

// LaneQueue is a lane's request queue and its dead-letter queue.
type LaneQueue struct {
	Queue, DeadLetterQueue string
}

// declared are the request queues Declare declares.
func (c AMQPConfig) declared() []LaneQueue {
	if len(c.Lanes) > 0 {
		return c.Lanes
	}
	return []LaneQueue{{c.Queue, c.DeadLetterQueue}}
}

const directReplyTo = "amq.rabbitmq.reply-to"

// AMQP sends requests to RabbitMQ and takes results on direct reply-to:
// each of its channels consumes amq.rabbitmq.reply-to (auto-ack, as
// RabbitMQ requires) and publishes with confirms, and replies are routed
// to waiting calls by correlation id. A lost connection fails the calls
// in flight (their replies cannot reach a new channel) and reconnects in
// the background.
type AMQP struct {
	cfg AMQPConfig
	log *slog.Logger

	mu   sync.Mutex
	sess *session // nil while disconnected

	next    atomic.Uint64
	late    atomic.Int64
	results chan Delivery // batch results, across reconnects

	reportMu sync.Mutex
	reports  *amqp.Channel // the batch results channel, for demand reports
	stop     context.CancelFunc
	done     chan struct{}
	closeMu  sync.Once
}

type session struct {
	conn  *amqp.Connection
	lanes []*lane
	dead  chan struct{}

	blockMu sync.Mutex
	reason  string        // why the broker blocks publishing; "" when it does not
	blocked chan struct{} // closed when the broker starts blocking; renewed when it stops
	pubs    sync.WaitGroup
}

// blocking returns why the broker blocks publishing ("" when it does
// not) and a channel closed when it starts to.
func (s *session) blocking() (string, <-chan struct{}) {
	s.blockMu.Lock()
	defer s.blockMu.Unlock()
	return s.reason, s.blocked
}

func (s *session) setBlocked(b amqp.Blocking) {
	s.blockMu.Lock()
	defer s.blockMu.Unlock()
	switch {
	case b.Active && s.reason == "":
		s.reason = b.Reason
		if s.reason == "" {
			s.reason = "resource alarm"
		}
		close(s.blocked)
	case !b.Active && s.reason != "":
		s.reason = ""
		s.blocked = make(chan struct{})
	}
}

// lane is one channel: a reply-to consumer and a confirming publisher.
type lane struct {
	a       *AMQP
	s       *session
	ch      *amqp.Channel
	pub     chan struct{} // held while a publish writes to the channel
	mu      sync.Mutex
	calls   map[string]*call
	failed  error
	dead    <-chan struct{} // the session's
	barrier chan chan struct{}
	retMu   sync.Mutex
	ret     map[string]string // correlation id -> the broker's reply text
}

// OpenAMQP connects (retrying until ctx is done) and keeps reconnecting
// until Close.
func OpenAMQP(ctx context.Context, cfg AMQPConfig, log *slog.Logger) (*AMQP, error) {
	if cfg.Channels <= 0 {
		cfg.Channels = 4
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 10 * time.Second
	}
	if cfg.ReconnectMin <= 0 {
		cfg.ReconnectMin = 250 * time.Millisecond
	}
	if cfg.ReconnectMax <= 0 {
		cfg.ReconnectMax = 15 * time.Second
	}
	if cfg.BatchPrefetch <= 0 {
		cfg.BatchPrefetch = 256
	}
	a := &AMQP{cfg: cfg, log: log, done: make(chan struct{}), results: make(chan Delivery)}
	s, err := a.connectRetry(ctx, true)
	if err != nil {
		return nil, err
	}
	a.set(s)
	sctx, stop := context.WithCancel(context.Background())
	a.stop = stop
	go a.supervise(sctx, s)
	return a, nil
}

func (a *AMQP) set(s *session) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.sess = s
}

func (a *AMQP) supervise(ctx context.Context, s *session) {
	defer close(a.done)
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.dead:
		}
		a.set(nil)
		a.log.Warn("connection to the broker lost; reconnecting")
		var err error
		if s, err = a.connectRetry(ctx, false); err != nil {
			return
		}
		a.set(s)
		a.log.Info("reconnected to the broker")
	}
}

// connectRetry dials until it succeeds or ctx is done. At start (first) an
// access refusal ends it: see ErrAccessRefused.
func (a *AMQP) connectRetry(ctx context.Context, first bool) (*session, error) {
	wait := a.cfg.ReconnectMin
	for {
		s, err := a.dial()
		if err == nil {
			return s, nil
		}
		if first && errors.Is(err, ErrAccessRefused) {
			return nil, fmt.Errorf("%w. Check the user name, password and vhost in the broker URL, and that the user may write to the request queue "+
				"(rabbitmqctl list_permissions); not retrying", err)
		}
		a.log.Warn("cannot connect to the broker; retrying", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
		case <-time.After(wait + rand.N(wait/4+1)):
		}
		wait = min(wait*2, a.cfg.ReconnectMax)
	}
}

func (a *AMQP) dial() (_ *session, err error) {
	conn, err := amqp.DialConfig(a.cfg.URL.Reveal(), amqp.Config{
		Heartbeat:       a.cfg.Heartbeat,
		TLSClientConfig: a.cfg.TLS,
		Properties:      amqp.Table{"connection_name": a.cfg.ConnectionName},
		Dial:            amqp.DefaultDial(10 * time.Second),
	})
	if err != nil {
		msg := fmt.Sprintf("dial %s: %s", secret.URL(a.cfg.URL.Reveal()), secret.Scrub(err.Error(), a.cfg.URL))
		if aerr := (*amqp.Error)(nil); errors.As(err, &aerr) && (aerr.Code == amqp.AccessRefused || aerr.Code == amqp.NotAllowed) {
			return nil, fmt.Errorf("%w: %s", ErrAccessRefused, msg)
		}
		return nil, errors.New(msg)
	}
	defer func() {
		if err != nil {
			_ = conn.Close()
		}
	}()
	if a.cfg.Declare {
		for _, q := range a.cfg.declared() {
			if err := rabbitmq.DeclareRequestQueue(conn, q.Queue, q.DeadLetterQueue, a.cfg.DeliveryLimit, a.log); err != nil {
				if aerr := (*amqp.Error)(nil); errors.As(err, &aerr) && aerr.Code == amqp.AccessRefused {
					return nil, fmt.Errorf("%w: %v (the user may not declare the queue: let it configure %q and %q, or declare them and set SOUS_DECLARE=false)",
						ErrAccessRefused, err, q.Queue, q.DeadLetterQueue)
				}
				return nil, err
			}
		}
	}
	s := &session{conn: conn, dead: make(chan struct{}), blocked: make(chan struct{})}
	closed := []<-chan *amqp.Error{conn.NotifyClose(make(chan *amqp.Error, 1))}
	for range a.cfg.Channels {
		l := &lane{a: a, s: s, pub: make(chan struct{}, 1), dead: s.dead, calls: map[string]*call{}, barrier: make(chan chan struct{}), ret: map[string]string{}}
		if l.ch, err = conn.Channel(); err != nil {
			return nil, fmt.Errorf("open channel: %w", err)
		}
		// Consume before the first publish that names amq.rabbitmq.reply-to.
		replies, err := l.ch.Consume(directReplyTo, "", true, false, false, false, nil)
		if err != nil {
			return nil, fmt.Errorf("consume direct reply-to: %w", err)
		}
		if err := l.ch.Confirm(false); err != nil {
			return nil, fmt.Errorf("enable publisher confirms: %w", err)
		}
		closed = append(closed, l.ch.NotifyClose(make(chan *amqp.Error, 1)))
		// Unbuffered: amqp091-go hands a basic.return to this channel before
		// it processes the basic.ack of the same message, so a publisher
		// that passes the barrier after its confirm sees its return.
		returns := l.ch.NotifyReturn(make(chan amqp.Return))
		go l.watchReturns(returns)
		go l.route(replies)
		s.lanes = append(s.lanes, l)
	}
	if a.cfg.BatchResults != "" {
		if err := a.consumeBatchResults(conn, &closed); err != nil {
			return nil, err
		}
	}
	// While the broker blocks publishing, requests fail at once (503) and
	// Ready says so (/readyz): a publish would wait for the alarm to clear.
	blocked := conn.NotifyBlocked(make(chan amqp.Blocking, 4))
	go func() {
		for b := range blocked {
			s.setBlocked(b)
			if b.Active {
				a.log.Warn("broker blocked publishing (resource alarm)", "reason", b.Reason)
			} else {
				a.log.Info("broker unblocked publishing")
			}
		}
	}()
	go func() {
		// Any channel or the connection closing ends the session; drain
		// the others so that the library never blocks on them.
		cases := make(chan *amqp.Error, len(closed))
		for _, c := range closed {
			go func() {
				// A graceful close sends nothing: it only closes c.
				var last *amqp.Error
				for e := range c {
					last = e
				}
				cases <- last
			}()
		}
		if why := <-cases; why != nil {
			a.log.Warn("broker channel closed", "code", why.Code, "reason", why.Reason)
		}
		// A deadline: a publish may be stuck writing to a broker that
		// no longer reads (blocked), holding the connection's writer.
		_ = conn.CloseDeadline(time.Now().Add(5 * time.Second))
		s.pubs.Wait()
		for _, l := range s.lanes {
			l.fail(fmt.Errorf("%w: the connection was lost while waiting for the answer", ErrUnavailable))
		}
		close(s.dead)
	}()
	return s, nil
}

// route hands each reply to its call; replies nobody waits for (the HTTP
// request went away, or a duplicate after a redelivery) are dropped.
func (l *lane) route(replies <-chan amqp.Delivery) {
	for d := range replies {
		l.mu.Lock()
		c := l.calls[d.CorrelationId]
		l.mu.Unlock()
		if c == nil {
			l.a.late.Add(1)
			l.a.log.Debug("reply for no waiting request dropped", "correlation_id", d.CorrelationId)
			continue
		}
		status, _ := d.Headers["x-sous-status"].(string)
		c.push(Reply{Chunk: status == "chunk", Body: d.Body})
	}
}

func (l *lane) watchReturns(returns <-chan amqp.Return) {
	for {
		select {
		case r, ok := <-returns:
			if !ok {
				return
			}
			l.retMu.Lock()
			l.ret[r.CorrelationId] = r.ReplyText
			l.retMu.Unlock()
		case b := <-l.barrier:
			close(b)
		}
	}
}

func (l *lane) fail(err error) {
	l.mu.Lock()
	l.failed = err
	calls := l.calls
	l.calls = map[string]*call{}
	l.mu.Unlock()
	for _, c := range calls {
		c.fail(err)
	}
}

// LateReplies counts replies dropped because no request waited for them.
func (a *AMQP) LateReplies() int64 { return a.late.Load() }

// Ready reports whether the broker connection is up.
func (a *AMQP) Ready(context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.sess
	if s == nil {
		return ErrUnavailable
	}
	if reason, _ := s.blocking(); reason != "" {
		return fmt.Errorf("%w: %s", ErrBlocked, reason)
	}
	return nil
}

// Send implements Broker.
func (a *AMQP) Send(ctx context.Context, m Message) (Call, error) {
	a.mu.Lock()
	s := a.sess
	a.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("%w: not connected (reconnecting)", ErrUnavailable)
	}
	if reason, _ := s.blocking(); reason != "" {
		return nil, fmt.Errorf("%w: %s", ErrBlocked, reason)
	}
	l := s.lanes[a.next.Add(1)%uint64(len(s.lanes))]
	c := newCall(l, m.ID)
	l.mu.Lock()
	if l.failed != nil {
		l.mu.Unlock()
		return nil, fmt.Errorf("%w: not connected (reconnecting)", ErrUnavailable)
	}
	l.calls[m.ID] = c
	l.mu.Unlock()
	if err := l.publish(ctx, m); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func (l *lane) publish(ctx context.Context, m Message) error {
	queue := m.Queue
	if queue == "" {
		queue = l.a.cfg.Queue
	}
	replyTo := m.ReplyTo
	if replyTo == "" {
		replyTo = directReplyTo
	}
	h := amqp.Table{"timestamp_in_ms": time.Now().UnixMilli()}
	for k, v := range m.Headers {
		h[k] = v
	}
	_, blocked := l.s.blocking()
	// amqp091-go checks ctx only before it writes to the socket, and a
	// blocked broker stops reading it: wait for the lane, the write and
	// the confirm only as long as ctx lasts and the broker does not block.
	select {
	case l.pub <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-blocked:
		return ErrBlocked
	case <-l.dead:
		return fmt.Errorf("%w: the connection was lost", ErrUnavailable)
	}
	type published struct {
		conf *amqp.DeferredConfirmation
		err  error
	}
	done := make(chan published, 1)
	l.s.pubs.Add(1)
	go func() {
		// Owned by the session, which waits for it before it is dead;
		// closing the connection (with a deadline) ends a stuck write.
		defer l.s.pubs.Done()
		defer func() { <-l.pub }()
		conf, err := l.ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, true, false, amqp.Publishing{
			ContentType: "application/json", DeliveryMode: amqp.Persistent,
			MessageId: m.ID, CorrelationId: m.ID, ReplyTo: replyTo,
			Timestamp: time.Now(), Headers: h, Body: m.Body,
		})
		done <- published{conf, err}
	}()
	var p published
	select {
	case p = <-done:
	case <-ctx.Done():
		return ctx.Err()
	case <-blocked:
		return ErrBlocked
	case <-l.dead:
		return fmt.Errorf("%w: the connection was lost", ErrUnavailable)
	}
	if p.err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w: publish: %v", ErrUnavailable, p.err)
	}
	select {
	case <-p.conf.Done():
	case <-ctx.Done():
		return ctx.Err()
	case <-blocked:
		// The broker may still take it when the alarm clears; the worker
		// then answers nobody (the reply is dropped as late).
		return ErrBlocked
	case <-l.dead:
		return fmt.Errorf("%w: no confirm: the connection was lost", ErrUnavailable)
	}
	ok := p.conf.Acked()
	// Sync with watchReturns: a return comes before its message's confirm.
	b := make(chan struct{})
	select {
	case l.barrier <- b:
		<-b
	case <-l.dead:
		return fmt.Errorf("%w: the connection was lost before the confirm", ErrUnavailable)
	case <-ctx.Done():
		return ctx.Err()
	}
	l.retMu.Lock()
	text, returned := l.ret[m.ID]
	delete(l.ret, m.ID)
	l.retMu.Unlock()
	if returned {
		return fmt.Errorf("%w: %q (%s)", ErrNoQueue, queue, text)
	}
	if !ok {
		if l.ch.IsClosed() {
			// amqp091-go settles outstanding confirms as nacks when the
			// channel closes: that is a lost connection, not a full queue.
			return fmt.Errorf("%w: the channel closed before the confirm", ErrUnavailable)
		}
		return ErrQueueFull
	}
	return nil
}

// Close stops reconnecting and closes the connection; calls in flight
// fail. Safe to call more than once.
func (a *AMQP) Close() error {
	a.closeMu.Do(func() {
		a.stop()
		<-a.done
		a.mu.Lock()
		s := a.sess
		a.mu.Unlock()
		if s != nil {
			_ = s.conn.CloseDeadline(time.Now().Add(5 * time.Second))
			<-s.dead
		}
		a.set(nil)
	})
	return nil
}

// call is a Call whose replies a broker's receiving goroutine pushes.
type call struct {
	owner  dropper
	id     string
	notify chan struct{}

	mu      sync.Mutex
	replies []Reply
	err     error
	closed  bool
}

// dropper is what routes replies to calls: Close asks it to forget one.
type dropper interface{ drop(*call) }

func newCall(owner dropper, id string) *call {
	return &call{owner: owner, id: id, notify: make(chan struct{}, 1)}
}

func (c *call) push(r Reply) {
	c.mu.Lock()
	c.replies = append(c.replies, r)
	c.mu.Unlock()
	c.wake()
}

func (c *call) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.wake()
}

func (c *call) wake() {
	select {
	case c.notify <- struct{}{}:
	default:
	}
}

func (c *call) Notify() <-chan struct{} { return c.notify }

func (c *call) Take() ([]Reply, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.replies
	c.replies = nil
	if len(r) > 0 {
		return r, nil
	}
	return nil, c.err
}

func (c *call) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.mu.Unlock()
	c.owner.drop(c)
}

func (l *lane) drop(c *call) {
	l.mu.Lock()
	if l.calls[c.id] == c {
		delete(l.calls, c.id)
	}
	l.mu.Unlock()
}

// newID returns a request id: 16 random bytes as hex.
func newID() string {
	return fmt.Sprintf("%016x%016x", rand.Uint64(), rand.Uint64())
}

// Delivery is a batch result taken from the results queue. Ack once it
// is recorded; Nack hands it back to the queue (another replica, or this
// one later, takes it).
type Delivery struct {
	CorrelationID string
	Chunk         bool
	Body          []byte
	// Returned is how many times the broker handed it back before
	// (a quorum queue's x-delivery-count).
	Returned  int64
	Ack, Nack func() error
}

// BatchResults delivers the batch results this replica takes from
// AMQPConfig.BatchResults, across reconnects. A delivery not settled
// before its connection is lost goes back to the queue.
func (a *AMQP) BatchResults() <-chan Delivery { return a.results }

// consumeBatchResults declares the batch results queue and forwards its
// deliveries to a.results until the channel closes.
func (a *AMQP) consumeBatchResults(conn *amqp.Connection, closed *[]<-chan *amqp.Error) error {
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open the batch results channel: %w", err)
	}
	q := a.cfg.BatchResults
	if _, err := ch.QueueDeclare(q, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
		return fmt.Errorf("declare the batch results queue %q: %w (it exists with other arguments? it must be a durable quorum queue)", q, err)
	}
	if err := ch.Qos(a.cfg.BatchPrefetch, 0, false); err != nil {
		return fmt.Errorf("set the batch results prefetch: %w", err)
	}
	deliveries, err := ch.Consume(q, "", false, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume the batch results queue %q: %w", q, err)
	}
	// Demand reports for the scaler go out on this channel (no confirms:
	// a report is worth only its freshness), to the exchange the workers
	// report on.
	if err := ch.ExchangeDeclare(fleet.Exchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare the reports exchange %q: %w", fleet.Exchange, err)
	}
	if err := ch.ExchangeDeclare(wire.CancelExchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare the cancellations exchange %q: %w", wire.CancelExchange, err)
	}
	a.reportMu.Lock()
	a.reports = ch
	a.reportMu.Unlock()
	*closed = append(*closed, ch.NotifyClose(make(chan *amqp.Error, 1)))
	go func() {
		for d := range deliveries {
			status, _ := d.Headers["x-sous-status"].(string)
			returned, _ := d.Headers["x-delivery-count"].(int64)
			dv := Delivery{CorrelationID: d.CorrelationId, Chunk: status == "chunk", Body: d.Body, Returned: returned,
				Ack: func() error { return d.Ack(false) }, Nack: func() error { return d.Nack(false, true) }}
			select {
			case a.results <- dv:
			case <-a.done:
				return
			}
		}
	}()
	return nil
}

// Publish publishes m persistently and returns once the broker confirmed
// it; its result goes to m.ReplyTo, not to a Call.
func (a *AMQP) Publish(ctx context.Context, m Message) error {
	a.mu.Lock()
	s := a.sess
	a.mu.Unlock()
	if s == nil {
		return fmt.Errorf("%w: not connected (reconnecting)", ErrUnavailable)
	}
	if reason, _ := s.blocking(); reason != "" {
		return fmt.Errorf("%w: %s", ErrBlocked, reason)
	}
	l := s.lanes[a.next.Add(1)%uint64(len(s.lanes))]
	return l.publish(ctx, m)
}

// PublishDemand sends a demand report (fleet.Demand) to the scaler's
// exchange: not persistent, expiring with the reports.
func (a *AMQP) PublishDemand(ctx context.Context, body []byte) error {
	a.reportMu.Lock()
	ch := a.reports
	a.reportMu.Unlock()
	if ch == nil || ch.IsClosed() {
		return fmt.Errorf("%w: not connected (reconnecting)", ErrUnavailable)
	}
	return ch.PublishWithContext(ctx, fleet.Exchange, "", false, false, amqp.Publishing{
		ContentType: "application/json", Body: body,
		Expiration: strconv.FormatInt(fleet.ReportTTL.Milliseconds(), 10),
	})
}

// PublishCancel tells every worker (wire.CancelExchange) that the requests
// a wire.Cancel names are no longer wanted.
func (a *AMQP) PublishCancel(ctx context.Context, body []byte) error {
	a.reportMu.Lock()
	ch := a.reports
	a.reportMu.Unlock()
	if ch == nil || ch.IsClosed() {
		return fmt.Errorf("%w: not connected (reconnecting)", ErrUnavailable)
	}
	return ch.PublishWithContext(ctx, wire.CancelExchange, "", false, false, amqp.Publishing{ContentType: "application/json", Body: body})
}
