package integration

import (
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/worker"
)

// managementURL is the RabbitMQ management API, as KEDA's rabbitmq scaler
// reads it with protocol: http.
func managementURL() string {
	if u := os.Getenv("RABBITMQ_MANAGEMENT_URL"); u != "" {
		return u
	}
	return "http://guest:guest@127.0.0.1:15672"
}

// queueMessages reads GET /api/queues/{vhost}/{queue} field "messages"
// (ready + unacknowledged), what KEDA's QueueLength mode counts.
func queueMessages(t *testing.T, q string) int {
	t.Helper()
	return queueStats(t, q).total
}

type stats struct{ total, ready, unacked int }

func queueStats(t *testing.T, q string) stats {
	t.Helper()
	resp, err := http.Get(managementURL() + "/api/queues/" + url.PathEscape("/") + "/" + url.PathEscape(q))
	if err != nil {
		t.Fatalf("management API (rabbitmq-plugins enable rabbitmq_management): %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("management API: %s", resp.Status)
	}
	var body struct {
		Messages *int `json:"messages"`
		Ready    int  `json:"messages_ready"`
		Unacked  int  `json:"messages_unacknowledged"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	if body.Messages == nil {
		return stats{-1, -1, -1} // stats not collected yet
	}
	return stats{*body.Messages, body.Ready, body.Unacked}
}

// TestScaleToZeroSemantics shows what KEDA sees: a message published to an
// idle queue makes the count non-zero (scale from zero); while a worker
// holds a batch in flight the count stays non-zero (no scale-down under
// it) even though no message is ready, which is why the ScaledObject uses
// protocol http and not amqp; after the drain it is zero.
func TestScaleToZeroSemantics(t *testing.T) {
	t.Parallel()
	q, results := names(t)
	c := newClient(t)
	c.declare(q)
	waitUntil(t, 30*time.Second, "stats for the idle queue", func() bool { return queueMessages(t, q) == 0 })
	c.publish(q, "wake", "", `{"prompt":"x","options":{"num_predict":8}}`)
	waitUntil(t, 30*time.Second, "a non-zero count (scale from zero)", func() bool { return queueMessages(t, q) == 1 })

	// The real Ollama behind a gate that holds generations until released,
	// so the batch stays in flight as long as the management API needs to
	// see it (its statistics refresh every 5s).
	gate := newGate(t, ollama.URL())
	w := startWorker(t, q, "SOUS_ENGINE_URL="+gate.url)
	// In flight: nothing ready (what protocol amqp would count: zero, so
	// KEDA would scale the busy worker away), one unacknowledged, and the
	// management API's total, what protocol http counts, stays 1.
	waitUntil(t, 60*time.Second, "the management API to see the request in flight", func() bool {
		s := queueStats(t, q)
		return s.ready == 0 && s.unacked == 1
	})
	if got := c.depth(q); got != 0 {
		t.Fatalf("AMQP passive declare counts %d ready while the batch runs, want 0", got)
	}
	if n := queueMessages(t, q); n != 1 {
		t.Fatalf("management API counts %d while a batch is in flight, want 1", n)
	}
	gate.release()
	c.collect(results, 1, 60*time.Second)
	waitUntil(t, 30*time.Second, "a zero count after the work", func() bool { return queueMessages(t, q) == 0 })
	if err := w.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := w.ExitCode(t, 30*time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

// TestPrefetchFollowsTheInFlightLimit: the broker holds what the worker is
// not working on. The worker's consumer prefetch is worker.Capacity of the
// in-flight limit, read back from the management API.
func TestPrefetchFollowsTheInFlightLimit(t *testing.T) {
	t.Parallel()
	q, _ := names(t)
	startWorker(t, q, "SOUS_BATCH_MAX=3", "SOUS_ENGINE_PARALLEL=8")
	waitUntil(t, 30*time.Second, "the consumer's prefetch in the management API", func() bool {
		return consumerPrefetch(t, q) == worker.Capacity(3)
	})
}

func consumerPrefetch(t *testing.T, q string) int {
	t.Helper()
	resp, err := http.Get(managementURL() + "/api/queues/" + url.PathEscape("/") + "/" + url.PathEscape(q))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Consumers []struct {
			Prefetch int `json:"prefetch_count"`
		} `json:"consumer_details"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || len(body.Consumers) != 1 {
		return -1
	}
	return body.Consumers[0].Prefetch
}
