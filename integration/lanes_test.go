package integration

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/servicebus/sbpeer"
	"github.com/sous-run/sous/internal/wire"
)

// TestLanesEndToEnd: one worker consumes two lanes on the real broker and
// the dev Ollama. Each lane's requests are answered once, naming their
// lane; an expired bulk request is dead-lettered in the bulk lane's DLQ
// with reason expired; sousctl publishes to a lane by name; /metrics
// counts per lane.
func TestLanesEndToEnd(t *testing.T) {
	t.Parallel()
	q, _ := names(t)
	inter, bulk := q+".interactive", q+".bulk"
	queues.Add(inter, inter+".dlq", bulk, bulk+".dlq")
	spec := "interactive=" + inter + ",bulk=" + bulk + ":share=0.2"
	c := newClient(t)
	reports := c.bindReports()
	w := startWorker(t, q, "SOUS_LANES="+spec, "OTEL_METRICS_EXPORTER=prometheus", "SOUS_REPORT_INTERVAL=200ms")
	if !strings.Contains(w.Logs(), "lanes=") || !strings.Contains(w.Logs(), "bulk="+bulk) {
		t.Fatalf("the start line does not show the lanes:\n%s", w.Logs())
	}
	replies := q + ".replies"
	c.declare(replies)
	for _, id := range []string{"b1", "b2", "b3", "b4"} {
		c.publish(bulk, id, replies, `{"prompt":"summarise","options":{"seed":1,"num_predict":4}}`)
	}
	c.publish(bulk, "late", replies, `{"prompt":"x","deadline":"2020-01-01T00:00:00Z"}`)
	for _, id := range []string{"i1", "i2"} {
		c.publish(inter, id, replies, `{"prompt":"hi","options":{"seed":1,"num_predict":4}}`)
	}
	got := c.collect(replies, 7, 60*time.Second)
	for id, d := range got {
		r := decodeResult(t, d)
		want := "bulk"
		if id[0] == 'i' {
			want = "interactive"
		}
		if r.Lane != want {
			t.Errorf("%s: lane %q, want %q: %s", id, r.Lane, want, d.Body)
		}
		if id == "late" {
			if r.Error == nil || r.Error.Code != wire.ReasonExpired {
				t.Errorf("late: %s, want an expired error", d.Body)
			}
		} else if r.Status != wire.StatusOK {
			t.Errorf("%s: %s", id, d.Body)
		}
	}
	dead := c.collect(bulk+".dlq", 1, 30*time.Second)
	if d, ok := dead["late"]; !ok || d.Headers[queue.HeaderDeadLetterReason] != wire.ReasonExpired {
		t.Fatalf("the expired request is not in the bulk lane's DLQ with reason expired: %v", dead)
	}
	if c.depth(inter) != 0 || c.depth(bulk) != 0 || c.depth(inter+".dlq") != 0 {
		t.Fatal("requests left in a lane's queue, or an interactive one dead-lettered")
	}

	cmd := exec.Command(filepath.Join(binDir, "sousctl"), "publish", "-url", brokerURL, "-lane", "interactive", "hello lanes")
	cmd.Env = append(os.Environ(), "SOUS_LANES="+spec)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "lane=interactive") || !strings.Contains(string(out), "lane interactive ("+inter+")") {
		t.Fatalf("sousctl publish -lane interactive: %v\n%s", err, out)
	}

	// The worker reports each lane's measured rates for the scaler.
	measured := map[string]fleet.Report{}
	waitUntil(t, 30*time.Second, "a report of each lane with its measured service time", func() bool {
		for _, r := range c.reports(reports) {
			if r.Worker == "it-"+q && r.MeanServiceS > 0 {
				measured[r.Queue] = r
			}
		}
		return len(measured) == 2
	})
	for queue, lane := range map[string]string{inter: "interactive", bulk: "bulk"} {
		if r := measured[queue]; r.Lane != lane || r.Limit <= 0 || r.ServedPerS <= 0 || r.OutputTokensPerS <= 0 {
			t.Errorf("report for %s: %+v", queue, r)
		}
	}

	waitUntil(t, 30*time.Second, "the lane counters in /metrics", func() bool {
		m := scrape(t, w.Addr)
		return strings.Contains(m, `sous_lane_served_total{sous_lane="interactive"} 3`) &&
			strings.Contains(m, `sous_lane_served_total{sous_lane="bulk"} 5`) &&
			strings.Contains(m, `sous_lane_deadline_missed_total{sous_lane="bulk"} 1`) &&
			strings.Contains(m, `sous_lane_waiting{sous_lane="bulk"} 0`)
	})
}

// TestLanesOnServiceBus: the same worker on Service Bus (the sbpeer test
// double, through the real azservicebus SDK on both sides): a receiver
// per lane queue, each request answered once, naming its lane.
func TestLanesOnServiceBus(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	q, results := names(t)
	spec := "interactive=" + q + ".interactive,bulk=" + q + ".bulk"
	startWorker(t, q, "SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_CONNECTION_STRING="+p.ConnectionString(), "SOUS_LANES="+spec)
	client, err := azservicebus.NewClientFromConnectionString(p.ConnectionString(), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	t.Cleanup(func() { _ = client.Close(context.Background()) })
	sent := map[string]string{} // id → lane
	for lane, ids := range map[string][]string{"interactive": {"i1", "i2"}, "bulk": {"b1", "b2", "b3"}} {
		s, err := client.NewSender(q+"."+lane, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range ids {
			id := id
			if err := s.SendMessage(ctx, &azservicebus.Message{MessageID: &id, ContentType: ptr("application/json"),
				Body: []byte(`{"prompt":"hi","options":{"seed":1,"num_predict":4}}`)}, nil); err != nil {
				t.Fatalf("send %s to lane %s: %v", id, lane, err)
			}
			sent[id] = lane
		}
		_ = s.Close(ctx)
	}
	r, err := client.NewReceiverForQueue(results, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	for len(got) < len(sent) && ctx.Err() == nil {
		msgs, err := r.ReceiveMessages(ctx, 10, nil)
		if err != nil {
			t.Fatalf("receive results: %v (have %v)", err, got)
		}
		for _, m := range msgs {
			var res wire.Result
			if err := json.Unmarshal(m.Body, &res); err != nil || res.Status != wire.StatusOK {
				t.Fatalf("result %s: %v", m.Body, err)
			}
			if res.Lane != sent[res.ID] {
				t.Errorf("%s: lane %q, want %q", res.ID, res.Lane, sent[res.ID])
			}
			got[res.ID]++
			if err := r.CompleteMessage(ctx, m, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	for id := range sent {
		if got[id] != 1 {
			t.Errorf("%s answered %d times, want once", id, got[id])
		}
	}
}

func ptr[T any](v T) *T { return &v }

// bindReports binds a fresh exclusive queue to the workers' reports
// exchange and returns its name.
func (c *client) bindReports() string {
	c.t.Helper()
	if err := c.ch.ExchangeDeclare(fleet.Exchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		c.t.Fatal(err)
	}
	q, err := c.ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		c.t.Fatal(err)
	}
	if err := c.ch.QueueBind(q.Name, "", fleet.Exchange, false, nil); err != nil {
		c.t.Fatal(err)
	}
	return q.Name
}

// reports takes the reports waiting in q.
func (c *client) reports(q string) []fleet.Report {
	c.t.Helper()
	var out []fleet.Report
	for {
		d, ok, err := c.ch.Get(q, true)
		if err != nil {
			c.t.Fatal(err)
		}
		if !ok {
			return out
		}
		r, err := fleet.Decode(d.Body)
		if err != nil {
			c.t.Fatalf("a report the scaler would refuse: %v: %s", err, d.Body)
		}
		out = append(out, r)
	}
}
