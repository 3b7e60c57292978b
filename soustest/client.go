package soustest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Result is a worker's answer to one request, as it arrives on the reply
// queue (the worker's result message; see README.md's message format).
type Result struct {
	ID         string     `json:"id"`
	Status     string     `json:"status"` // "ok" or "error"
	Model      string     `json:"model"`
	Response   string     `json:"response"` // generate requests
	Message    *Message   `json:"message"`  // chat requests
	DoneReason string     `json:"done_reason"`
	Worker     string     `json:"worker"`
	Attempt    int        `json:"attempt"`
	Error      *ErrorInfo `json:"error"`
	// Raw is the whole message body, for fields this type leaves out.
	Raw json.RawMessage `json:"-"`
}

// Message is a chat message.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// ErrorInfo says why a request failed.
type ErrorInfo struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Prompt publishes a generate request for prompt and waits for its result.
func (c *Container) Prompt(ctx context.Context, prompt string) (Result, error) {
	id, err := newID()
	if err != nil {
		return Result{}, err
	}
	if err := c.Publish(ctx, id, map[string]string{"prompt": prompt}); err != nil {
		return Result{}, err
	}
	return c.Await(ctx, id)
}

// Publish sends request to the worker's queue, with message id id and the
// helpers' reply queue as reply_to, and returns once the broker has
// confirmed it; Await(ctx, id) then waits for its result. A string, []byte
// or json.RawMessage is sent as it is (the JSON of a request); any other
// value is encoded as JSON.
func (c *Container) Publish(ctx context.Context, id string, request any) error {
	var body []byte
	switch r := request.(type) {
	case string:
		body = []byte(r)
	case []byte:
		body = r
	case json.RawMessage:
		body = r
	default:
		b, err := json.Marshal(request)
		if err != nil {
			return fmt.Errorf("soustest: encode request %s: %w", id, err)
		}
		body = b
	}
	cl, err := c.connect()
	if err != nil {
		return err
	}
	return cl.publish(ctx, c.queue, id, body)
}

// Await waits for the result of the request published with id. Results that
// arrive for other ids are kept for their own Await.
func (c *Container) Await(ctx context.Context, id string) (Result, error) {
	cl, err := c.connect()
	if err != nil {
		return Result{}, err
	}
	return cl.await(ctx, id)
}

// connect opens the helpers' broker connection once.
func (c *Container) connect() (*client, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.client != nil {
		return c.client, nil
	}
	cl, err := dial(c.clientURL)
	if err != nil {
		return nil, err
	}
	c.client = cl
	return cl, nil
}

// client is one connection with a confirming channel and a private reply
// queue, whose results a goroutine collects until the connection closes.
type client struct {
	conn    *amqp.Connection
	ch      *amqp.Channel
	replyTo string
	done    chan struct{} // closed when the collecting goroutine has ended

	pubMu sync.Mutex // one publish at a time: confirms are per channel

	mu      sync.Mutex
	results map[string]Result
	arrived chan struct{} // closed and replaced when a result arrives
	err     error         // why collection stopped
}

func dial(url string) (*client, error) {
	conn, err := amqp.Dial(url)
	if err != nil {
		return nil, fmt.Errorf("soustest: connect to the broker (WithClientAMQPURL / WithAMQPURL): %w", err)
	}
	cl := &client{conn: conn, results: map[string]Result{}, arrived: make(chan struct{}), done: make(chan struct{})}
	if err := cl.setup(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("soustest: %w", err)
	}
	return cl, nil
}

func (cl *client) setup() error {
	ch, err := cl.conn.Channel()
	if err != nil {
		return err
	}
	cl.ch = ch
	if err := ch.Confirm(false); err != nil {
		return err
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		return fmt.Errorf("declare the reply queue: %w", err)
	}
	cl.replyTo = q.Name
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume the reply queue: %w", err)
	}
	go cl.collect(deliveries)
	return nil
}

// collect stores results by id until deliveries closes (the connection or
// channel closed). Stream chunks (no status) are not results and are dropped.
func (cl *client) collect(deliveries <-chan amqp.Delivery) {
	defer close(cl.done)
	for d := range deliveries {
		var r Result
		if err := json.Unmarshal(d.Body, &r); err != nil || r.Status == "" {
			continue
		}
		r.Raw = append(json.RawMessage(nil), d.Body...)
		id := d.CorrelationId
		if id == "" {
			id = r.ID
		}
		cl.mu.Lock()
		cl.results[id] = r
		close(cl.arrived)
		cl.arrived = make(chan struct{})
		cl.mu.Unlock()
	}
	cl.mu.Lock()
	cl.err = errors.New("soustest: the broker connection closed")
	close(cl.arrived)
	cl.mu.Unlock()
}

func (cl *client) publish(ctx context.Context, queue, id string, body []byte) error {
	cl.pubMu.Lock()
	defer cl.pubMu.Unlock()
	conf, err := cl.ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, false, false, amqp.Publishing{
		MessageId: id, ReplyTo: cl.replyTo, ContentType: "application/json",
		DeliveryMode: amqp.Persistent, Timestamp: time.Now(), Body: body,
	})
	if err != nil {
		return fmt.Errorf("soustest: publish %s: %w", id, err)
	}
	ok, err := conf.WaitContext(ctx)
	if err != nil {
		return fmt.Errorf("soustest: publish %s: %w", id, err)
	}
	if !ok {
		return fmt.Errorf("soustest: publish %s: the broker refused it (nack)", id)
	}
	return nil
}

func (cl *client) await(ctx context.Context, id string) (Result, error) {
	for {
		cl.mu.Lock()
		r, ok := cl.results[id]
		if ok {
			delete(cl.results, id)
		}
		arrived, err := cl.arrived, cl.err
		cl.mu.Unlock()
		switch {
		case ok:
			return r, nil
		case err != nil:
			return Result{}, err
		}
		select {
		case <-arrived:
		case <-ctx.Done():
			return Result{}, fmt.Errorf("soustest: await the result of %s: %w", id, ctx.Err())
		}
	}
}

func (cl *client) close() {
	cl.conn.Close()
	<-cl.done
}

func newID() (string, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("soustest: %w", err)
	}
	return "soustest-" + hex.EncodeToString(b), nil
}
