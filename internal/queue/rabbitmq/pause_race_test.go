package rabbitmq_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
)

// receiveAll receives and acks until every one of ids has come, and
// reports how many distinct ones came by ctx's end.
func receiveAll(ctx context.Context, t *testing.T, d *rabbitmq.Driver, n int, each func()) int {
	t.Helper()
	seen := map[string]bool{}
	for len(seen) < n && ctx.Err() == nil {
		if each != nil {
			each()
		}
		rctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		ds, err := d.Receive(rctx, 3)
		cancel()
		if err != nil {
			continue
		}
		for _, del := range ds {
			seen[del.ID] = true
			if err := d.Settle(context.WithoutCancel(ctx), del, queue.Settlement{Action: queue.Ack}); err != nil {
				t.Errorf("ack %s: %v", del.ID, err)
			}
		}
	}
	return len(seen)
}

func publishN(t *testing.T, ctx context.Context, d *rabbitmq.Driver, q string, n int) {
	t.Helper()
	for i := range n {
		if err := d.Publish(ctx, queue.Message{To: q, MessageID: fmt.Sprint("m", i), Body: []byte("{}"), Persistent: true}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestPauseDuringAConsumerRestart replays the race of Pause (the outage
// prober's goroutine) with a consumer restart for a prefetch change (the
// receive goroutine): Pause lands between the cancel of the old consumer
// and the start of the new one. Before, the new consumer stayed live on a
// paused driver; after Resume another one replaced it, the first one's
// deliveries were never read, and the multiple acks of the second covered
// their tags: 21 of 40 requests acked unread. Now the restart is one step
// for Pause, which waits for it and then stops the new consumer.
func TestPauseDuringAConsumerRestart(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 10, Consume: true})
	const n = 40
	publishN(t, ctx, d, q, n)
	var once sync.Once
	paused := make(chan struct{})
	rabbitmq.SetRestartHook(d, func() {
		once.Do(func() {
			go func() {
				if err := d.Pause(ctx); err != nil {
					t.Errorf("pause: %v", err)
				}
				close(paused)
			}()
			// Let Pause run here if it can (it could before); it cannot
			// any more, so go on after a while: the verdict does not rest
			// on this wait, only whether the race is replayed.
			select {
			case <-paused:
			case <-time.After(2 * time.Second):
			}
		})
	})
	if err := d.SetPrefetch(ctx, 20); err != nil {
		t.Fatal(err)
	}
	first, cancel := context.WithTimeout(ctx, 5*time.Second)
	got, _ := d.Receive(first, 5) // restarts the consumer; Pause lands inside
	cancel()
	<-paused
	for _, del := range got {
		if err := d.Settle(ctx, del, queue.Settlement{Action: queue.Ack}); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, del := range got {
		seen[del.ID] = true
	}
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	rest := receiveAll(wctx, t, d, n-len(seen), nil)
	if total := len(seen) + rest; total < n {
		t.Fatalf("received %d of %d requests after a pause during a consumer restart; the rest were acked unread or held by a consumer left behind", total, n)
	}
}

// TestPauseRaceStress interleaves Pause and Resume at random with consumer
// restarts (a prefetch change before each Receive, and Pause inside some
// restarts) while every delivery is acked: every request is received.
// Run it with -count=50.
func TestPauseRaceStress(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 4, Consume: true})
	const n = 60
	publishN(t, ctx, d, q, n)
	var mu sync.Mutex
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	roll := func(k int) int { mu.Lock(); defer mu.Unlock(); return rng.IntN(k) }
	var wg sync.WaitGroup
	defer wg.Wait()
	pauseResume := func() {
		_ = d.Pause(ctx)
		time.Sleep(time.Duration(roll(3)) * time.Millisecond)
		_ = d.Resume(ctx)
	}
	rabbitmq.SetRestartHook(d, func() {
		if roll(3) == 0 {
			wg.Go(pauseResume)
			time.Sleep(time.Duration(roll(2)) * time.Millisecond)
		}
	})
	stop := make(chan struct{})
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(roll(20)) * time.Millisecond):
				pauseResume()
			}
		}
	})
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	got := receiveAll(wctx, t, d, n, func() { _ = d.SetPrefetch(ctx, 3+roll(4)) })
	close(stop)
	if got < n {
		t.Fatalf("received %d of %d requests under random pauses and consumer restarts", got, n)
	}
}
