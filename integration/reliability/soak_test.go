package reliability

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestSoak streams requests through the worker (built without the race
// detector, so its memory is its own) and a fast engine, sampling the
// worker's RSS from /proc and its goroutines from /debug/pprof (SOUS_PPROF)
// along the way. It checks zero loss, zero duplicates (no fault is
// injected), RSS flat after warm-up, and as many goroutines once idle again
// as when idle at the start.
//
// The normal suite runs 5,000 requests; SOUS_SOAK=1 runs 100,000
// (SOUS_SOAK_REQUESTS overrides either):
//
//	SOUS_SOAK=1 go test -run Soak -v -timeout 30m ./integration/reliability/
func TestSoak(t *testing.T) {
	t.Parallel()
	n := 5000
	if os.Getenv("SOUS_SOAK") == "1" {
		n = 100_000
	}
	if s := os.Getenv("SOUS_SOAK_REQUESTS"); s != "" {
		v, err := strconv.Atoi(s)
		must(t, err)
		n = v
	}
	eng := newFakeEngine(t)
	q := names(t)
	w := startWorker(t, workerOpts{bin: plainWorker(t), queue: q, engineURL: eng.URL(), env: []string{
		"SOUS_PPROF=true", "SOUS_LOG_LEVEL=info", "SOUS_BATCH_MAX=32", "SOUS_ENGINE_PARALLEL=32"}})
	l := watch(t, sharedURL, q)
	c := newClient(t, sharedURL)

	// Warm up: the engine client's connection pool and the first batches.
	c.publishRequests(q, "warm", 64)
	waitUntil(t, 60*time.Second, "the warm-up requests", func() bool { return c.depth(q) == 0 })
	time.Sleep(2 * time.Second) // idle
	idleBefore := goroutines(t, w)
	heapBefore := heapInuse(t, w)
	allocBefore := memStat(t, w, "TotalAlloc")
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("s%d", i)
	}

	// Publish from one goroutine while the worker drains.
	start := time.Now()
	pubErr := make(chan error, 1)
	go func() {
		const chunk = 1000
		for i := 0; i < n; i += chunk {
			ms := make([]msg, 0, chunk)
			for _, id := range ids[i:min(i+chunk, n)] {
				ms = append(ms, msg{id: id, body: request(id)})
			}
			if err := c.publishAll(q, ms); err != nil {
				pubErr <- err
				return
			}
		}
		pubErr <- nil
	}()

	type sample struct {
		at       time.Duration
		settled  int
		rssKB    int
		routines int
	}
	var (
		mu      sync.Mutex
		samples []sample
	)
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			s := sample{at: time.Since(start), settled: l.settled(ids), rssKB: rss(w.Pid()), routines: goroutinesOr(w, -1)}
			mu.Lock()
			samples = append(samples, s)
			mu.Unlock()
		}
	}()
	within := 5*time.Minute + time.Duration(n)*10*time.Millisecond
	tl := l.waitSettled(t, ids, within)
	took := time.Since(start)
	close(stop)
	<-sampled
	if err := <-pubErr; err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // idle again: batch timers and settle goroutines gone
	idleAfter := goroutines(t, w)
	heapAfter := heapInuse(t, w)
	allocPerRequest := (memStat(t, w, "TotalAlloc") - allocBefore) / n
	rssEnd := rss(w.Pid())

	checkNoLoss(t, tl)
	if tl.duplicates > 0 || tl.dead > 0 {
		t.Errorf("no fault was injected, yet %s", tl)
	}
	mu.Lock()
	defer mu.Unlock()
	// Warm-up ends when a tenth of the requests are settled.
	warm := 0
	for i, s := range samples {
		if s.settled >= n/10 {
			warm = i
			break
		}
	}
	rssWarm, rssMax, peakRoutines := 0, 0, 0
	if len(samples) > 0 {
		rssWarm = samples[warm].rssKB
	}
	for _, s := range samples {
		rssMax = max(rssMax, s.rssKB)
		peakRoutines = max(peakRoutines, s.routines)
	}
	// RSS swings with each batch (the Ollama client allocates 8 MiB per
	// call): compare the median of the first and second halves after
	// warm-up rather than two single samples.
	var rsss []int
	for _, s := range samples[warm:] {
		rsss = append(rsss, s.rssKB)
	}
	firstHalf, secondHalf := median(rsss[:len(rsss)/2]), median(rsss[len(rsss)/2:])
	var trace strings.Builder
	for _, s := range samples {
		fmt.Fprintf(&trace, "  t=%5.1fs settled=%6d rss=%6dkB goroutines=%d\n", s.at.Seconds(), s.settled, s.rssKB, s.routines)
	}
	if testing.Verbose() {
		t.Logf("samples:\n%s", trace.String())
	}
	figure(t, "requests", n)
	figure(t, "duration_s", fmt.Sprintf("%.1f", took.Seconds()))
	figure(t, "throughput_per_s", fmt.Sprintf("%.0f", float64(n)/took.Seconds()))
	figure(t, "tally", tl)
	figure(t, "lost", len(tl.missing))
	figure(t, "duplicates", tl.duplicates)
	figure(t, "rss_after_warmup_kB", rssWarm)
	figure(t, "rss_max_kB", rssMax)
	figure(t, "rss_end_kB", rssEnd)
	figure(t, "rss_median_first_half_kB", firstHalf)
	figure(t, "rss_median_second_half_kB", secondHalf)
	figure(t, "heap_inuse_idle_before_kB", heapBefore/1024)
	figure(t, "heap_inuse_idle_after_kB", heapAfter/1024)
	figure(t, "allocated_per_request_kB", allocPerRequest/1024)
	figure(t, "goroutines_idle_before", idleBefore)
	figure(t, "goroutines_peak", peakRoutines)
	figure(t, "goroutines_idle_after", idleAfter)
	// A short run has too few samples for a trend; it checks the heap and
	// goroutines below, which do not swing.
	if len(rsss) >= 20 && secondHalf > max(firstHalf*3/2, firstHalf+32*1024) {
		t.Errorf("RSS grew: median %d kB in the first half, %d kB in the second:\n%s", firstHalf, secondHalf, trace.String())
	}
	if heapAfter > heapBefore+16<<20 {
		t.Errorf("heap in use after GC, idle: %d kB before, %d kB after %d requests", heapBefore/1024, heapAfter/1024, n)
	}
	if idleAfter > idleBefore+3 {
		_, dump := w.GetBody("/debug/pprof/goroutine?debug=1")
		t.Errorf("goroutines idle: %d before, %d after %d requests:\n%s", idleBefore, idleAfter, n, dump)
	}
}

// rss is the resident set size of pid in kB, from /proc; 0 when unknown.
func rss(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			v, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			return v
		}
	}
	return 0
}

func median(v []int) int {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// heapInuse is the worker's HeapInuse in bytes right after a GC, from
// /debug/pprof/heap?debug=1&gc=1.
func heapInuse(t testing.TB, w *workerProc) int {
	t.Helper()
	return memStat(t, w, "HeapInuse")
}

// memStat reads one runtime.MemStats field of the worker, right after a GC,
// from /debug/pprof/heap?debug=1&gc=1.
func memStat(t testing.TB, w *workerProc, name string) int {
	t.Helper()
	code, body := w.GetBody("/debug/pprof/heap?debug=1&gc=1")
	if code != 200 {
		t.Fatalf("cannot read the worker's heap profile: %d", code)
	}
	for line := range strings.Lines(body) {
		if rest, ok := strings.CutPrefix(line, "# "+name+" = "); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(rest))
			return n
		}
	}
	t.Fatalf("no %s in the heap profile", name)
	return 0
}

// goroutines reads the worker's goroutine count from
// /debug/pprof/goroutine?debug=1, leaving out the engine client's idle
// keep-alive connections (two goroutines each, at most one per concurrent
// engine call, closed after 90s idle): a pool, not a leak.
func goroutines(t testing.TB, w *workerProc) int {
	t.Helper()
	n := goroutinesOr(w, -1)
	if n < 0 {
		t.Fatal("cannot read the worker's goroutine profile (SOUS_PPROF=true?)")
	}
	return n
}

func goroutinesOr(w *workerProc, def int) int {
	code, body := w.GetBody("/debug/pprof/goroutine?debug=1")
	if code != 200 || !strings.HasPrefix(body, "goroutine profile: total ") {
		return def
	}
	// Stacks are blocks separated by blank lines, each headed "N @ pcs".
	n := 0
	for _, block := range strings.Split(body, "\n\n") {
		head, _, _ := strings.Cut(strings.TrimPrefix(block, "\n"), " @ ")
		count, err := strconv.Atoi(strings.TrimSpace(head))
		if err != nil {
			if i := strings.Index(block, "\n"); i > 0 { // the first block starts with the total line
				head, _, _ = strings.Cut(block[i+1:], " @ ")
				count, err = strconv.Atoi(strings.TrimSpace(head))
			}
			if err != nil {
				continue
			}
		}
		if strings.Contains(block, "net/http.(*persistConn)") {
			continue
		}
		n += count
	}
	return n
}
