package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"log/slog"
	"strconv"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/worker"
)

// laneReporter is what the reports read of the worker.
type laneReporter interface {
	LaneStats() []worker.LaneStat
	LaneRates() []worker.LaneRate
}

// startReports publishes, every SOUS_REPORT_INTERVAL, one fleet.Report per
// lane to the fanout exchange fleet.Exchange, for the work-aware scaler
// (cmd/scaler), on a connection of its own. A failed report is logged and
// the next one tried on a fresh connection: reports never hold the work
// back. RabbitMQ only; off with SOUS_REPORT_INTERVAL=0.
func startReports(ctx context.Context, cfg Config, w laneReporter, limit func() int, log *slog.Logger) (stop func()) {
	if cfg.ReportInterval <= 0 {
		return func() {}
	}
	if cfg.Broker != "rabbitmq" {
		log.Info("reports for the scaler go over RabbitMQ only; the scaler prices this broker's queues with its prior (SOUS_SCALER_PRIOR_SECONDS)")
		return func() {}
	}
	tlsCfg, err := cfg.amqp().TLS()
	if err != nil {
		log.Warn("reports off: TLS", "err", err)
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		r := &reporter{cfg: cfg, tls: tlsCfg, log: log}
		defer r.close()
		t := time.NewTicker(cfg.ReportInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			r.send(ctx, reports(cfg.WorkerID, w, limit(), time.Now()))
		}
	}()
	return func() { cancel(); <-done }
}

// reports builds the worker's reports at now.
func reports(workerID string, w laneReporter, limit int, now time.Time) []fleet.Report {
	stats := w.LaneStats()
	var out []fleet.Report
	for i, r := range w.LaneRates() {
		rep := fleet.Report{Worker: workerID, Lane: r.Name, Queue: r.Queue, At: now, Limit: limit,
			ServedPerS: r.ServedPerS, OutputTokensPerS: r.OutputTokensPerS, MeanServiceS: r.MeanServiceS}
		if i < len(stats) {
			rep.InFlight = stats[i].InFlight
		}
		out = append(out, rep)
	}
	return out
}

type reporter struct {
	cfg    Config
	tls    *tls.Config
	log    *slog.Logger
	conn   *amqp.Connection
	ch     *amqp.Channel
	failed bool // the last report failed: say so once, and when it works again
}

func (r *reporter) send(ctx context.Context, reps []fleet.Report) {
	err := r.publish(ctx, reps)
	switch {
	case err != nil && !r.failed:
		r.failed = true
		r.log.Warn("report to the scaler failed; trying again at each interval", "exchange", fleet.Exchange, "err", secret.Scrub(err.Error(), r.cfg.AMQPURL))
	case err == nil && r.failed:
		r.failed = false
		r.log.Info("reports to the scaler work again")
	}
	if err != nil {
		r.close()
	}
}

func (r *reporter) publish(ctx context.Context, reps []fleet.Report) error {
	if r.ch == nil || r.ch.IsClosed() {
		r.close()
		conn, err := amqp.DialConfig(r.cfg.AMQPURL.Reveal(), amqp.Config{
			Heartbeat: r.cfg.AMQPHeartbeat, TLSClientConfig: r.tls, Dial: amqp.DefaultDial(10 * time.Second),
			Properties: amqp.Table{"connection_name": "sous-worker " + r.cfg.WorkerID + " reports"},
		})
		if err != nil {
			return err
		}
		ch, err := conn.Channel()
		if err == nil {
			err = ch.ExchangeDeclare(fleet.Exchange, amqp.ExchangeFanout, true, false, false, false, nil)
		}
		if err != nil {
			conn.Close()
			return err
		}
		r.conn, r.ch = conn, ch
	}
	ttl := strconv.FormatInt(fleet.ReportTTL.Milliseconds(), 10)
	for _, rep := range reps {
		body, _ := json.Marshal(rep)
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := r.ch.PublishWithContext(pctx, fleet.Exchange, "", false, false, amqp.Publishing{
			ContentType: "application/json", DeliveryMode: amqp.Transient, Expiration: ttl, Timestamp: rep.At, Body: body,
		})
		cancel()
		if err != nil {
			return err
		}
	}
	return nil
}

func (r *reporter) close() {
	if r.conn != nil {
		_ = r.conn.Close()
	}
	r.conn, r.ch = nil, nil
}
