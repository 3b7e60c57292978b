package reliability

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/worker"
)

// TestResourceAlarm: the broker raises a memory alarm while the worker is
// busy. RabbitMQ then blocks every connection that publishes, the worker's
// included: results cannot be published, so nothing may be acked, and
// nothing comes out until the alarm clears. Then every request is answered
// and none is dead-lettered.
//
// An alarm shorter than the worker's 30 s settle timeout costs nothing
// more: the confirms arrive late. A longer one times out the settlements
// of what the worker holds; each is requeued (its result may still go out
// when the broker reads again), so those requests can be answered twice:
// at most the worker's window, worker.Capacity.
func TestResourceAlarm(t *testing.T) {
	t.Parallel()
	const batch = 4
	for _, tt := range []struct {
		name          string
		alarm         time.Duration
		maxDuplicates int
	}{
		{"shorter than the settle timeout", 10 * time.Second, 0},
		{"longer than the settle timeout", 45 * time.Second, worker.Capacity(batch)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			node := startNode(t, nodeOptions{})
			eng := newFakeEngine(t)
			eng.setDelay(200 * time.Millisecond) // 300 requests in batches of 4: about 15 s of work
			q := names(t)
			w := startWorker(t, workerOpts{queue: q, brokerURL: node.URL(), engineURL: eng.URL(),
				env: []string{"SOUS_LOG_LEVEL=info", fmt.Sprintf("SOUS_BATCH_MAX=%d", batch)}})
			l := watch(t, node.URL(), q)
			c := newClient(t, node.URL())
			const n = 300
			ids := c.publishRequests(q, "a", n)
			waitUntil(t, 60*time.Second, "the first results", func() bool { return l.settled(ids) >= 20 })

			ctx, cancel := context.WithTimeout(context.Background(), tt.alarm+time.Minute)
			defer cancel()
			_, err := node.ctl(ctx, "set_vm_memory_high_watermark", "0.000001")
			must(t, err)
			raised := time.Now()
			before := l.settled(ids)
			if before >= n {
				t.Fatal("every request was answered before the alarm: nothing tested")
			}
			waitUntil(t, 20*time.Second, "the worker to log the alarm", func() bool {
				return strings.Contains(w.Logs(), "broker blocked publishing")
			})
			// Confirms already on their way when the alarm went up get 2 s to
			// arrive; after that nothing may come out until it clears.
			time.Sleep(2 * time.Second)
			at := l.settled(ids)
			time.Sleep(tt.alarm - time.Since(raised))
			during := l.settled(ids) - at
			_, err = node.ctl(ctx, "set_vm_memory_high_watermark", "0.4")
			must(t, err)
			cleared := time.Now()

			tl := l.waitSettled(t, ids, 120*time.Second)
			checkNoLoss(t, tl)
			figure(t, "answered_before_alarm", before)
			figure(t, "results_during_alarm", during)
			figure(t, "all_answered_after_clear_s", fmt.Sprintf("%.1f", time.Since(cleared).Seconds()))
			figure(t, "duplicates", tl.duplicates)
			if tl.dead > 0 {
				t.Errorf("%d requests dead-lettered by a %s resource alarm", tl.dead, tt.alarm)
			}
			if during > 0 {
				t.Errorf("%d results came out while the broker blocked publishing", during)
			}
			if tl.duplicates > tt.maxDuplicates {
				t.Errorf("%d duplicate results, want at most %d", tl.duplicates, tt.maxDuplicates)
			}
			if !strings.Contains(w.Logs(), "broker unblocked publishing") {
				t.Errorf("the worker did not log the end of the alarm:\n%s", tail(w.Logs(), 20))
			}
		})
	}
}
