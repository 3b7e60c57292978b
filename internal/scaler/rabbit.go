package scaler

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/secret"
)

// StateQueue keeps the scaler's last costs across restarts without a
// volume: a last-value queue (x-max-length 1, the oldest dropped).
const StateQueue = "sous.scaler.state"

// RabbitConfig says how the scaler reaches RabbitMQ.
type RabbitConfig struct {
	URL secret.Value
	TLS *tls.Config
	// ManagementURL, when set, is the management API
	// (http://user:password@host:15672): depths then count the requests
	// workers hold (unacknowledged) as the broker sees them. Without it,
	// they are the workers' own reports.
	ManagementURL secret.Value
	// SaveEvery is how often changed costs are saved (default 30s).
	SaveEvery time.Duration
	// StateQueue is where they are saved (default StateQueue).
	StateQueue string
	// Exchange is where the reports come from (default fleet.Exchange).
	Exchange string
}

// Rabbit reads queue depths, consumes the workers' reports and the
// producers' demands into a fleet.View, and saves the view's costs in
// StateQueue. Safe for concurrent use.
type Rabbit struct {
	cfg  RabbitConfig
	log  *slog.Logger
	http *http.Client

	mu   sync.Mutex // guards conn and ch, the depth channel
	conn *amqp.Connection
	ch   *amqp.Channel
}

// NewRabbit returns a Rabbit; it connects on first use.
func NewRabbit(cfg RabbitConfig, log *slog.Logger) *Rabbit {
	if cfg.SaveEvery <= 0 {
		cfg.SaveEvery = 30 * time.Second
	}
	if cfg.StateQueue == "" {
		cfg.StateQueue = StateQueue
	}
	if cfg.Exchange == "" {
		cfg.Exchange = fleet.Exchange
	}
	return &Rabbit{cfg: cfg, log: log, http: &http.Client{Timeout: 5 * time.Second}}
}

func (r *Rabbit) dial(name string) (*amqp.Connection, error) {
	conn, err := amqp.DialConfig(r.cfg.URL.Reveal(), amqp.Config{
		TLSClientConfig: r.cfg.TLS, Dial: amqp.DefaultDial(10 * time.Second), Heartbeat: 10 * time.Second,
		Properties: amqp.Table{"connection_name": "sous-scaler " + name},
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s: %s", secret.URL(r.cfg.URL.Reveal()), secret.Scrub(err.Error(), r.cfg.URL))
	}
	return conn, nil
}

// Depth implements Depth.
func (r *Rabbit) Depth(ctx context.Context, queue string) (int, bool, error) {
	if r.cfg.ManagementURL != "" {
		n, err := r.managementDepth(ctx, queue)
		return n, true, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ch == nil || r.ch.IsClosed() {
		if r.conn == nil || r.conn.IsClosed() {
			conn, err := r.dial("depth")
			if err != nil {
				return 0, false, err
			}
			r.conn = conn
		}
		ch, err := r.conn.Channel()
		if err != nil {
			_ = r.conn.Close()
			r.conn = nil
			return 0, false, err
		}
		r.ch = ch
	}
	q, err := r.ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	if err != nil {
		r.ch = nil // a failed passive declare closes the channel
		var ae *amqp.Error
		if errors.As(err, &ae) && ae.Code == amqp.NotFound {
			return 0, false, fmt.Errorf("%w: %s", ErrNoQueue, queue)
		}
		return 0, false, err
	}
	return q.Messages, false, nil
}

// managementDepth reads ready + unacknowledged from the management API.
func (r *Rabbit) managementDepth(ctx context.Context, queue string) (int, error) {
	base, err := url.Parse(r.cfg.ManagementURL.Reveal())
	if err != nil {
		return 0, errors.New("SOUS_SCALER_MANAGEMENT_URL is not a URL")
	}
	vhost := "/"
	if u, err := url.Parse(r.cfg.URL.Reveal()); err == nil && len(u.Path) > 1 {
		vhost = u.Path[1:]
	}
	raw := strings.TrimSuffix(base.String(), "/") + "/api/queues/" + url.PathEscape(vhost) + "/" + url.PathEscape(queue)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, raw, nil)
	if err != nil {
		return 0, err
	}
	resp, err := r.http.Do(req)
	if err != nil {
		return 0, errors.New(secret.Scrub(err.Error(), r.cfg.ManagementURL))
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		return 0, fmt.Errorf("%w: %s", ErrNoQueue, queue)
	default:
		return 0, fmt.Errorf("management API: %s", resp.Status)
	}
	var q struct {
		Messages int `json:"messages"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&q); err != nil {
		return 0, fmt.Errorf("management API: %w", err)
	}
	return q.Messages, nil
}

// LoadState reads the costs saved in StateQueue; nil when there are none.
func (r *Rabbit) LoadState() (map[string]float64, error) {
	conn, err := r.dial("state")
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return nil, err
	}
	if err := r.declareState(ch); err != nil {
		return nil, err
	}
	d, ok, err := ch.Get(r.cfg.StateQueue, false)
	if err != nil || !ok {
		return nil, err
	}
	defer func() { _ = d.Nack(false, true) }() // leave it for the next start
	var costs map[string]float64
	if err := json.Unmarshal(d.Body, &costs); err != nil {
		return nil, fmt.Errorf("%s: %w", r.cfg.StateQueue, err)
	}
	return costs, nil
}

func (r *Rabbit) declareState(ch *amqp.Channel) error {
	_, err := ch.QueueDeclare(r.cfg.StateQueue, true, false, false, false, amqp.Table{"x-max-length": int64(1), "x-overflow": "drop-head"})
	return err
}

// Run consumes the workers' reports and the producers' demands into view
// and saves its costs when they change, reconnecting after a failure,
// until ctx ends.
func (r *Rabbit) Run(ctx context.Context, view *fleet.View) {
	wait := time.Second
	for ctx.Err() == nil {
		err := r.consume(ctx, view)
		if ctx.Err() != nil {
			return
		}
		r.log.Warn("reports: connection lost; connecting again", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
		wait = min(2*wait, 30*time.Second)
	}
}

func (r *Rabbit) consume(ctx context.Context, view *fleet.View) error {
	conn, err := r.dial("reports")
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	if err := ch.ExchangeDeclare(r.cfg.Exchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return err
	}
	q, err := ch.QueueDeclare("", false, true, true, false, amqp.Table{"x-message-ttl": fleet.ReportTTL.Milliseconds()})
	if err != nil {
		return err
	}
	if err := ch.QueueBind(q.Name, "", r.cfg.Exchange, false, nil); err != nil {
		return err
	}
	if err := r.declareState(ch); err != nil {
		return err
	}
	ds, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		return err
	}
	r.log.Info("reading the workers' reports", "exchange", r.cfg.Exchange)
	save := time.NewTicker(r.cfg.SaveEvery)
	defer save.Stop()
	saved := view.Costs()
	for {
		select {
		case <-ctx.Done():
			return nil
		case d, ok := <-ds:
			if !ok {
				return errors.New("the reports consumer was closed")
			}
			if fleet.IsDemand(d.Body) {
				dem, err := fleet.DecodeDemand(d.Body)
				if err != nil {
					r.log.Warn("a demand was not understood; ignored", "err", err)
					continue
				}
				view.AddDemand(dem)
				continue
			}
			rep, err := fleet.Decode(d.Body)
			if err != nil {
				r.log.Warn("a report was not understood; ignored", "err", err)
				continue
			}
			view.Add(rep)
		case <-save.C:
			costs := view.Costs()
			if maps.Equal(costs, saved) {
				continue
			}
			body, _ := json.Marshal(costs)
			if err := ch.PublishWithContext(ctx, "", r.cfg.StateQueue, false, false, amqp.Publishing{
				ContentType: "application/json", DeliveryMode: amqp.Persistent, Body: body,
			}); err != nil {
				return err
			}
			saved = costs
		}
	}
}

// Close closes the depth connection.
func (r *Rabbit) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conn != nil {
		_ = r.conn.Close()
		r.conn, r.ch = nil, nil
	}
}
