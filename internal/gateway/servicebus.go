package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"
	"github.com/Azure/go-amqp"

	"github.com/sous-run/sous/internal/secret"
)

// ServiceBusConfig configures a ServiceBus broker.
type ServiceBusConfig struct {
	// ConnectionString, or Namespace with Credential (default: azidentity's
	// DefaultAzureCredential), reach the namespace; ConnectionString wins.
	ConnectionString secret.Value
	Namespace        string
	Credential       azcore.TokenCredential
	// Queue is the request queue, where a Message that names no queue goes.
	Queue string
	// LaneQueues are the lanes' request queues (SOUS_GATEWAY_LANES); a
	// sender for each, and for Queue, is made at the start, and a Message
	// may name only one of them.
	LaneQueues []string
	// ReplyQueue is a session-enabled queue (RequiresSession) where workers
	// send results and chunks, in the session the request names.
	ReplyQueue string
	// Sessions is how many reply sessions this gateway holds, each with its
	// own receiver link (default 4).
	Sessions int
	// SessionPrefix makes the session ids, "<prefix>-<n>"; it must be unique
	// among the gateways sharing ReplyQueue (default: random).
	SessionPrefix string
	// RenewInterval is the longest time between renewals of a session's
	// lock; renewal also happens at half the remaining lock time when that
	// is sooner (default 20s).
	RenewInterval time.Duration
	// ReconnectMin and ReconnectMax bound the wait between attempts to
	// accept a session again (default 250ms, 15s).
	ReconnectMin time.Duration
	ReconnectMax time.Duration
	// ClientOptions are the SDK's (retries); nil: its defaults.
	ClientOptions *azservicebus.ClientOptions
}

// ServiceBus sends requests to an Azure Service Bus queue and takes results
// in reply sessions, Service Bus's request/reply pattern: each request
// carries ReplyTo (the reply queue) and ReplyToSessionID (one of this
// gateway's sessions), the worker sends its chunks and result with that
// SessionID, and the gateway, which holds the session's lock, receives
// them in the order they were sent and routes them to waiting calls by
// correlation id. Replies are received in ReceiveAndDelete mode (as
// RabbitMQ's direct reply-to is auto-ack): a receiver link that fails
// fails the calls of its session, whose replies in flight may be lost, and
// the session is accepted again in the background.
type ServiceBus struct {
	cfg     ServiceBusConfig
	log     *slog.Logger
	client  *azservicebus.Client
	senders map[string]*azservicebus.Sender // by queue; read-only after Open
	lanes   []*sbLane

	next    atomic.Uint64
	late    atomic.Int64
	stop    context.CancelFunc
	wg      sync.WaitGroup
	closeMu sync.Once
}

// sbLane is one reply session and the calls waiting on it.
type sbLane struct {
	sb      *ServiceBus
	session string

	mu    sync.Mutex
	up    bool
	calls map[string]*call
}

// OpenServiceBus builds the client and accepts the reply sessions, waiting
// (until ctx is done) for at least one; the others keep trying in the
// background until Close.
func OpenServiceBus(ctx context.Context, cfg ServiceBusConfig, log *slog.Logger) (*ServiceBus, error) {
	if cfg.Sessions <= 0 {
		cfg.Sessions = 4
	}
	if cfg.SessionPrefix == "" {
		cfg.SessionPrefix = "sous-gateway-" + newID()[:16]
	}
	if cfg.RenewInterval <= 0 {
		cfg.RenewInterval = 20 * time.Second
	}
	if cfg.ReconnectMin <= 0 {
		cfg.ReconnectMin = 250 * time.Millisecond
	}
	if cfg.ReconnectMax <= 0 {
		cfg.ReconnectMax = 15 * time.Second
	}
	opts := cfg.ClientOptions
	if opts == nil {
		opts = &azservicebus.ClientOptions{}
	}
	if opts.ApplicationID == "" {
		o := *opts
		o.ApplicationID = "sous-gateway"
		opts = &o
	}
	var (
		client *azservicebus.Client
		err    error
	)
	if !cfg.ConnectionString.IsZero() {
		if client, err = azservicebus.NewClientFromConnectionString(cfg.ConnectionString.Reveal(), opts); err != nil {
			return nil, fmt.Errorf("the Service Bus connection string is invalid: %s", secret.Scrub(err.Error(), cfg.ConnectionString))
		}
	} else {
		cred := cfg.Credential
		if cred == nil {
			if cred, err = azidentity.NewDefaultAzureCredential(nil); err != nil {
				return nil, fmt.Errorf("azure credential for %s: %w", cfg.Namespace, err)
			}
		}
		if client, err = azservicebus.NewClient(cfg.Namespace, cred, opts); err != nil {
			return nil, fmt.Errorf("service bus client for %s: %w", cfg.Namespace, err)
		}
	}
	senders := map[string]*azservicebus.Sender{}
	for _, q := range append([]string{cfg.Queue}, cfg.LaneQueues...) {
		if senders[q] != nil {
			continue
		}
		sender, err := client.NewSender(q, nil)
		if err != nil {
			_ = client.Close(ctx)
			return nil, fmt.Errorf("sender for %q: %w", q, err)
		}
		senders[q] = sender
	}
	s := &ServiceBus{cfg: cfg, log: log, client: client, senders: senders}
	runCtx, stop := context.WithCancel(context.Background())
	s.stop = stop
	for i := range cfg.Sessions {
		l := &sbLane{sb: s, session: fmt.Sprintf("%s-%d", cfg.SessionPrefix, i), calls: map[string]*call{}}
		s.lanes = append(s.lanes, l)
		s.wg.Go(func() { l.run(runCtx) })
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for s.Ready(ctx) != nil {
		select {
		case <-ctx.Done():
			_ = s.Close()
			return nil, fmt.Errorf("%w: no reply session on %q could be accepted (it must exist with sessions enabled)", ErrUnavailable, cfg.ReplyQueue)
		case <-tick.C:
		}
	}
	return s, nil
}

// run accepts the lane's session and receives its replies until ctx is
// done, accepting it again after a failure.
func (l *sbLane) run(ctx context.Context) {
	cfg := l.sb.cfg
	wait := cfg.ReconnectMin
	for ctx.Err() == nil {
		r, err := l.sb.client.AcceptSessionForQueue(ctx, cfg.ReplyQueue, l.session,
			&azservicebus.SessionReceiverOptions{ReceiveMode: azservicebus.ReceiveModeReceiveAndDelete})
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			l.sb.log.Warn("cannot accept the reply session; retrying (the reply queue must exist with sessions enabled)",
				"reply_queue", cfg.ReplyQueue, "session", l.session, "err", err, "retry_in", wait)
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait + rand.N(wait/4+1)):
			}
			wait = min(wait*2, cfg.ReconnectMax)
			continue
		}
		wait = cfg.ReconnectMin
		l.setUp(true)
		l.sb.log.Debug("reply session accepted", "reply_queue", cfg.ReplyQueue, "session", l.session)
		err = l.receive(ctx, r)
		l.setUp(false)
		l.fail(fmt.Errorf("%w: the reply session was lost while waiting for the answer", ErrUnavailable))
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_ = r.Close(closeCtx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		l.sb.log.Warn("reply session lost; accepting it again", "session", l.session, "err", err)
	}
}

// sessionReceiver is what a lane needs of *azservicebus.SessionReceiver.
type sessionReceiver interface {
	ReceiveMessages(ctx context.Context, max int, o *azservicebus.ReceiveMessagesOptions) ([]*azservicebus.ReceivedMessage, error)
	RenewSessionLock(ctx context.Context, o *azservicebus.RenewSessionLockOptions) error
	LockedUntil() time.Time
}

var _ sessionReceiver = (*azservicebus.SessionReceiver)(nil)

// receive routes the session's replies until receiving or renewing the
// session's lock fails, or ctx is done.
func (l *sbLane) receive(ctx context.Context, r sessionReceiver) error {
	// Read once: the SDK updates it from its own goroutines.
	every := min(l.sb.cfg.RenewInterval, time.Until(r.LockedUntil())/2)
	every = max(every, 10*time.Millisecond)
	var renewer sync.WaitGroup
	defer renewer.Wait() // after cancel, below
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	renewer.Go(func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if err := r.RenewSessionLock(ctx, nil); err != nil {
				cancel(fmt.Errorf("renew the session lock: %w", err))
				return
			}
		}
	})
	// TimeAfterFirstMessage: return what has arrived at once rather than
	// wait (the SDK's default is 1s in ReceiveAndDelete mode) for more.
	opts := &azservicebus.ReceiveMessagesOptions{TimeAfterFirstMessage: time.Nanosecond}
	for {
		msgs, err := r.ReceiveMessages(ctx, 256, opts)
		for _, m := range msgs {
			l.route(m)
		}
		if err == nil && len(msgs) == 0 {
			// ReceiveMessages blocks until a message comes or ctx ends; it
			// returns nothing and no error when the link or connection
			// failed (the SDK would recover it on the next call). Replies
			// in flight on the failed link are lost: start over.
			err = errors.New("the reply session's link or connection failed")
		}
		if err != nil {
			if cause := context.Cause(ctx); cause != nil {
				return cause
			}
			return err
		}
	}
}

func (l *sbLane) route(m *azservicebus.ReceivedMessage) {
	id := ""
	if m.CorrelationID != nil {
		id = *m.CorrelationID
	}
	l.mu.Lock()
	c := l.calls[id]
	l.mu.Unlock()
	if c == nil {
		l.sb.late.Add(1)
		l.sb.log.Debug("reply for no waiting request dropped", "correlation_id", id)
		return
	}
	status, _ := m.ApplicationProperties["x-sous-status"].(string)
	c.push(Reply{Chunk: status == "chunk", Body: m.Body})
}

func (l *sbLane) setUp(up bool) {
	l.mu.Lock()
	l.up = up
	l.mu.Unlock()
}

func (l *sbLane) fail(err error) {
	l.mu.Lock()
	calls := l.calls
	l.calls = map[string]*call{}
	l.mu.Unlock()
	for _, c := range calls {
		c.fail(err)
	}
}

func (l *sbLane) drop(c *call) {
	l.mu.Lock()
	if l.calls[c.id] == c {
		delete(l.calls, c.id)
	}
	l.mu.Unlock()
}

// add registers a call, if the lane's session is held.
func (l *sbLane) add(id string) *call {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.up {
		return nil
	}
	c := newCall(l, id)
	l.calls[id] = c
	return c
}

// LateReplies counts replies dropped because no request waited for them.
func (s *ServiceBus) LateReplies() int64 { return s.late.Load() }

// Ready reports whether a reply session is held, so that a request's
// answer can come back.
func (s *ServiceBus) Ready(context.Context) error {
	for _, l := range s.lanes {
		l.mu.Lock()
		up := l.up
		l.mu.Unlock()
		if up {
			return nil
		}
	}
	return fmt.Errorf("%w: no reply session is held (accepting)", ErrUnavailable)
}

// Send implements Broker: the request goes to the request queue with
// ReplyTo and ReplyToSessionID naming one of the sessions this gateway
// holds; it returns once Service Bus has accepted it.
func (s *ServiceBus) Send(ctx context.Context, m Message) (Call, error) {
	queue := m.Queue
	if queue == "" {
		queue = s.cfg.Queue
	}
	sender := s.senders[queue]
	if sender == nil {
		return nil, fmt.Errorf("%w: %q is not among the gateway's queues", ErrNoQueue, queue)
	}
	var c *call
	var l *sbLane
	start := s.next.Add(1)
	for i := range uint64(len(s.lanes)) {
		l = s.lanes[(start+i)%uint64(len(s.lanes))]
		if c = l.add(m.ID); c != nil {
			break
		}
	}
	if c == nil {
		return nil, fmt.Errorf("%w: no reply session is held (accepting)", ErrUnavailable)
	}
	msg := &azservicebus.Message{
		MessageID: &m.ID, CorrelationID: &m.ID, ContentType: ptrTo("application/json"),
		ReplyTo: &s.cfg.ReplyQueue, ReplyToSessionID: &l.session, Body: m.Body,
	}
	if len(m.Headers) > 0 {
		msg.ApplicationProperties = make(map[string]any, len(m.Headers))
		for k, v := range m.Headers {
			msg.ApplicationProperties[k] = v
		}
	}
	if err := sender.SendMessage(ctx, msg, nil); err != nil {
		c.Close()
		return nil, sendError(ctx, queue, err)
	}
	return c, nil
}

// sendError classifies a failed send: a full queue is
// amqp:resource-limit-exceeded (QuotaExceeded), a missing one
// amqp:not-found.
func sendError(ctx context.Context, queue string, err error) error {
	var ae *amqp.Error
	var se *azservicebus.Error
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.As(err, &ae) && ae.Condition == amqp.ErrCondResourceLimitExceeded:
		return fmt.Errorf("%w (%s)", ErrQueueFull, ae.Description)
	case (errors.As(err, &ae) && ae.Condition == amqp.ErrCondNotFound) || (errors.As(err, &se) && se.Code == azservicebus.CodeNotFound):
		return fmt.Errorf("%w: %q", ErrNoQueue, queue)
	}
	return fmt.Errorf("%w: send: %v", ErrUnavailable, err)
}

func ptrTo[T any](v T) *T { return &v }

// Close stops accepting sessions, fails the calls in flight, closes the
// receivers, the sender and the client. Safe to call more than once.
func (s *ServiceBus) Close() error {
	s.closeMu.Do(func() {
		s.stop()
		s.wg.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, sender := range s.senders {
			_ = sender.Close(ctx)
		}
		_ = s.client.Close(ctx)
	})
	return nil
}
