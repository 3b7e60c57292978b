package batchstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/gateway/batchstore"
	"github.com/sous-run/sous/internal/pgtest"
)

// t0 is the tests' clock: whole milliseconds, as the store keeps them.
var t0 = time.UnixMilli(1_760_000_000_000).UTC()

func at(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

// newURL returns the URL of a fresh, empty store.
type newURL func(t *testing.T) string

// TestStore runs the contract suite against each driver.
func TestStore(t *testing.T) {
	t.Parallel()
	t.Run("sqlite", func(t *testing.T) {
		t.Parallel()
		contract(t, func(t *testing.T) string {
			return "sqlite:" + filepath.Join(t.TempDir(), "store.db")
		})
	})
	t.Run("postgres", func(t *testing.T) {
		t.Parallel()
		server := pgtest.Start(t)
		contract(t, func(t *testing.T) string { return pgtest.Database(t, server) })
	})
}

func contract(t *testing.T, url newURL) {
	for _, tc := range []struct {
		name string
		test func(*testing.T, newURL)
	}{
		{"FileRoundTrip", testFileRoundTrip},
		{"FileTooLarge", testFileTooLarge},
		{"FileList", testFileList},
		{"SlowUpload", testSlowUpload},
		{"FileDelete", testFileDelete},
		{"Batches", testBatches},
		{"Transitions", testTransitions},
		{"Lines", testLines},
		{"Results", testResults},
		{"ConcurrentResults", testConcurrentResults},
		{"Finalize", testFinalize},
		{"FinalizeLarge", testFinalizeLarge},
		{"Lease", testLease},
		{"Reopen", testReopen},
		{"ConcurrentOpen", testConcurrentOpen},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.test(t, url)
		})
	}
}

func open(t *testing.T, url string) *batchstore.Store {
	t.Helper()
	s, err := batchstore.Open(context.Background(), url)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// randomBytes returns n bytes from a fixed seed.
func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func readFile(t *testing.T, s *batchstore.Store, id string) []byte {
	t.Helper()
	rc, err := s.OpenFile(context.Background(), id)
	if err != nil {
		t.Fatalf("OpenFile %s: %v", id, err)
	}
	defer rc.Close()
	// A small, odd buffer crosses chunk boundaries mid-read.
	var out bytes.Buffer
	if _, err := io.CopyBuffer(&out, struct{ io.Reader }{rc}, make([]byte, 100_003)); err != nil {
		t.Fatalf("read %s: %v", id, err)
	}
	return out.Bytes()
}

func testFileRoundTrip(t *testing.T, url newURL) {
	ctx := context.Background()
	s := open(t, url(t))
	for _, n := range []int{0, 10, 1 << 20, 3<<20 + 1<<19} {
		content := randomBytes(n, uint64(n))
		in := batchstore.File{ID: fmt.Sprintf("file-%d", n), Owner: "alice", Purpose: "batch", Filename: "in.jsonl", CreatedAt: at(n)}
		got, err := s.CreateFile(ctx, in, bytes.NewReader(content), 200<<20)
		if err != nil {
			t.Fatalf("CreateFile %d bytes: %v", n, err)
		}
		want := in
		want.Bytes = int64(n)
		if got != want {
			t.Errorf("CreateFile = %+v, want %+v", got, want)
		}
		if got, err := s.File(ctx, in.ID); err != nil || got != want {
			t.Errorf("File = %+v, %v, want %+v", got, err, want)
		}
		if got := readFile(t, s, in.ID); !bytes.Equal(got, content) {
			t.Errorf("read back %d bytes, want the %d written", len(got), n)
		}
	}
	if _, err := s.File(ctx, "nope"); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("File(nope) = %v, want ErrNotFound", err)
	}
	if _, err := s.OpenFile(ctx, "nope"); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("OpenFile(nope) = %v, want ErrNotFound", err)
	}
}

func testFileTooLarge(t *testing.T, url newURL) {
	ctx := context.Background()
	s := open(t, url(t))
	big := randomBytes(3<<20+1<<19, 1)
	f := batchstore.File{ID: "file-big", Owner: "alice", Purpose: "batch", Filename: "big.jsonl", CreatedAt: t0}
	if _, err := s.CreateFile(ctx, f, bytes.NewReader(big), 2<<20); !errors.Is(err, batchstore.ErrTooLarge) {
		t.Fatalf("CreateFile past maxBytes = %v, want ErrTooLarge", err)
	}
	if _, err := s.File(ctx, f.ID); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("File after ErrTooLarge = %v, want ErrNotFound", err)
	}
	// Nothing was kept: the same id takes new, smaller content, which reads
	// back without any chunk of the refused one.
	small := big[:100]
	if _, err := s.CreateFile(ctx, f, bytes.NewReader(small), 100); err != nil {
		t.Fatalf("CreateFile of exactly maxBytes: %v", err)
	}
	if got := readFile(t, s, f.ID); !bytes.Equal(got, small) {
		t.Errorf("read back %d bytes, want 100", len(got))
	}
}

// testSlowUpload checks that an upload still arriving holds up no other
// write (with SQLite's single writer, it must not sit in a transaction).
func testSlowUpload(t *testing.T, url newURL) {
	ctx := context.Background()
	u := url(t)
	s := open(t, u)
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		_, err := s.CreateFile(ctx, batchstore.File{ID: "slow", Owner: "alice", Purpose: "batch", CreatedAt: t0}, pr, 1<<20)
		done <- err
	}()
	if _, err := pw.Write([]byte("first half,")); err != nil {
		t.Fatal(err)
	}
	// The upload is now waiting for more content.
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := s.CreateBatch(wctx, newBatch("b", "alice", 0)); err != nil {
		t.Fatalf("CreateBatch during an upload: %v", err)
	}
	if _, err := s.Lease(wctx, "publisher", "a", time.Second, t0); err != nil {
		t.Fatalf("Lease during an upload: %v", err)
	}
	pw.Write([]byte("second half"))
	pw.Close()
	if err := <-done; err != nil {
		t.Fatalf("CreateFile: %v", err)
	}
	if got := string(readFile(t, s, "slow")); got != "first half,second half" {
		t.Errorf("read back %q", got)
	}
	if _, err := s.CreateFile(ctx, batchstore.File{ID: "big"}, bytes.NewReader(make([]byte, 11)), 10); !errors.Is(err, batchstore.ErrTooLarge) {
		t.Errorf("CreateFile = %v, want ErrTooLarge", err)
	}
	if path, ok := strings.CutPrefix(u, "sqlite:"); ok {
		left, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".batchstore-upload-*"))
		if len(left) > 0 {
			t.Errorf("uploads' temporary files left behind: %v", left)
		}
	}
}

func testFileList(t *testing.T, url newURL) {
	ctx := context.Background()
	s := open(t, url(t))
	// f1..f6 for alice, f3 and f4 at the same time (ordered by id), and one
	// file of bob's.
	files := []struct {
		id, owner, purpose string
		ms                 int
	}{
		{"f1", "alice", "batch", 1}, {"f2", "alice", "fine-tune", 2}, {"f3", "alice", "batch", 3},
		{"f4", "alice", "batch", 3}, {"f5", "alice", "batch_output", 5}, {"f6", "alice", "batch", 6},
		{"g1", "bob", "batch", 4},
	}
	for _, f := range files {
		if _, err := s.CreateFile(ctx, batchstore.File{ID: f.id, Owner: f.owner, Purpose: f.purpose, Filename: f.id, CreatedAt: at(f.ms)}, strings.NewReader(f.id), 100); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		purpose string
		asc     bool
		limit   int
		want    []string
	}{
		{"", false, 2, []string{"f6", "f5", "f4", "f3", "f2", "f1"}},
		{"", true, 4, []string{"f1", "f2", "f3", "f4", "f5", "f6"}},
		{"batch", false, 1, []string{"f6", "f4", "f3", "f1"}},
		{"batch", true, 3, []string{"f1", "f3", "f4", "f6"}},
		{"fine-tune", false, 10, []string{"f2"}},
		{"nothing", false, 10, nil},
	} {
		var got []string
		after := ""
		for page := 0; ; page++ {
			fs, more, err := s.Files(ctx, "alice", tc.purpose, after, tc.limit, tc.asc)
			if err != nil {
				t.Fatalf("Files: %v", err)
			}
			if len(fs) > tc.limit {
				t.Fatalf("Files gave %d files, limit %d", len(fs), tc.limit)
			}
			for _, f := range fs {
				got = append(got, f.ID)
			}
			if !more {
				break
			}
			if page > 10 || len(fs) == 0 {
				t.Fatalf("Files does not end: %v", got)
			}
			after = fs[len(fs)-1].ID
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Files(purpose %q, asc %v, limit %d) = %v, want %v", tc.purpose, tc.asc, tc.limit, got, tc.want)
		}
	}
	if _, _, err := s.Files(ctx, "alice", "", "missing", 10, false); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("Files after a missing id = %v, want ErrNotFound", err)
	}
}

func testFileDelete(t *testing.T, url newURL) {
	ctx := context.Background()
	s := open(t, url(t))
	content := randomBytes(1<<20+5, 2)
	for _, id := range []string{"keep", "drop"} {
		if _, err := s.CreateFile(ctx, batchstore.File{ID: id, Owner: "alice", Purpose: "batch", CreatedAt: t0}, bytes.NewReader(content), 10<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteFile(ctx, "drop"); err != nil {
		t.Fatalf("DeleteFile: %v", err)
	}
	if err := s.DeleteFile(ctx, "drop"); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("DeleteFile twice = %v, want ErrNotFound", err)
	}
	if _, err := s.OpenFile(ctx, "drop"); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("OpenFile of a deleted file = %v, want ErrNotFound", err)
	}
	fs, _, err := s.Files(ctx, "alice", "", "", 10, false)
	if err != nil || len(fs) != 1 || fs[0].ID != "keep" {
		t.Errorf("Files after delete = %v, %v, want [keep]", fs, err)
	}
	if got := readFile(t, s, "keep"); !bytes.Equal(got, content) {
		t.Error("the other file changed")
	}
	// A reader of a file deleted under it ends in an error, not short data.
	rc, err := s.OpenFile(ctx, "keep")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, err := rc.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteFile(ctx, "keep"); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(rc); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("reading a deleted file = %v, want io.ErrUnexpectedEOF", err)
	}
}

func newBatch(id, owner string, ms int) batchstore.Batch {
	return batchstore.Batch{
		ID: id, Owner: owner, Endpoint: "/v1/chat/completions", InputFileID: "file-" + id,
		CompletionWindow: "24h", Queue: "sous.requests", Status: batchstore.Validating,
		CreatedAt: at(ms), ExpiresAt: at(ms).Add(24 * time.Hour),
	}
}

func mustBatch(t *testing.T, s *batchstore.Store, id string) batchstore.Batch {
	t.Helper()
	b, err := s.Batch(context.Background(), id)
	if err != nil {
		t.Fatalf("Batch %s: %v", id, err)
	}
	return b
}

func testBatches(t *testing.T, url newURL) {
	ctx := context.Background()
	s := open(t, url(t))
	full := newBatch("batch_full", "alice", 1)
	full.Metadata = map[string]string{"team": "search", "run": "7"}
	full.Errors = []batchstore.LineError{{Code: "invalid", Message: "bad", Param: "body", Line: 3}}
	full.OutputFileID, full.ErrorFileID = "out", "err"
	full.Status = batchstore.InProgress
	full.InProgressAt, full.FinalizingAt, full.CompletedAt, full.FailedAt = at(2), at(3), at(4), at(5)
	full.ExpiredAt, full.CancellingAt, full.CancelledAt = at(6), at(7), at(8)
	full.Total, full.Completed, full.Failed, full.Published = 10, 4, 3, 9
	if err := s.CreateBatch(ctx, full); err != nil {
		t.Fatalf("CreateBatch: %v", err)
	}
	if got := mustBatch(t, s, full.ID); !reflect.DeepEqual(got, full) {
		t.Errorf("Batch =\n%+v\nwant\n%+v", got, full)
	}
	bare := newBatch("batch_bare", "alice", 2)
	if err := s.CreateBatch(ctx, bare); err != nil {
		t.Fatal(err)
	}
	if got := mustBatch(t, s, bare.ID); !reflect.DeepEqual(got, bare) {
		t.Errorf("Batch =\n%+v\nwant\n%+v", got, bare)
	}
	if err := s.CreateBatch(ctx, bare); err == nil {
		t.Error("CreateBatch of an existing id succeeded")
	}
	if _, err := s.Batch(ctx, "nope"); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("Batch(nope) = %v, want ErrNotFound", err)
	}
	for i, ms := range []int{5, 3, 3, 4} {
		if err := s.CreateBatch(ctx, newBatch(fmt.Sprintf("b%d", i), "alice", ms)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.CreateBatch(ctx, newBatch("bob1", "bob", 9)); err != nil {
		t.Fatal(err)
	}
	var got []string
	after := ""
	for {
		bs, more, err := s.Batches(ctx, "alice", after, 2)
		if err != nil {
			t.Fatalf("Batches: %v", err)
		}
		for _, b := range bs {
			got = append(got, b.ID)
		}
		if !more {
			break
		}
		after = bs[len(bs)-1].ID
	}
	want := []string{"b0", "b3", "b2", "b1", "batch_bare", "batch_full"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Batches = %v, want %v", got, want)
	}
}

func testTransitions(t *testing.T, url newURL) {
	ctx := context.Background()
	s := open(t, url(t))
	for i, id := range []string{"a", "b", "c", "d"} {
		if err := s.CreateBatch(ctx, newBatch(id, "alice", i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.AddLines(ctx, "b", []batchstore.Line{{Index: 0, CustomID: "x", Request: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	check := func(name string, ok bool, err error, want bool) {
		t.Helper()
		if err != nil || ok != want {
			t.Errorf("%s = %v, %v, want %v", name, ok, err, want)
		}
	}
	var seven []batchstore.Line
	for i := range 7 {
		seven = append(seven, batchstore.Line{Index: i, CustomID: fmt.Sprint("a-", i), Request: []byte(`{}`)})
	}
	if err := s.AddLines(ctx, "a", seven); err != nil {
		t.Fatal(err)
	}
	if ok, err := s.Start(ctx, "b", 2, at(10)); ok || !errors.Is(err, batchstore.ErrNotValidating) {
		t.Errorf("Start with lines missing = %v, %v, want ErrNotValidating", ok, err)
	}
	ok, err := s.Start(ctx, "a", 7, at(10))
	check("Start", ok, err, true)
	if err := s.AddLines(ctx, "a", []batchstore.Line{{Index: 7, CustomID: "late", Request: []byte(`{}`)}}); !errors.Is(err, batchstore.ErrNotValidating) {
		t.Errorf("AddLines to an in_progress batch = %v, want ErrNotValidating", err)
	}
	if err := s.DeleteLines(ctx, "a"); !errors.Is(err, batchstore.ErrNotValidating) {
		t.Errorf("DeleteLines of an in_progress batch = %v, want ErrNotValidating", err)
	}
	ok, err = s.Start(ctx, "a", 9, at(11))
	check("Start again", ok, err, false)
	a := mustBatch(t, s, "a")
	if a.Status != batchstore.InProgress || a.Total != 7 || !a.InProgressAt.Equal(at(10)) {
		t.Errorf("after Start: status %s total %d in_progress_at %v", a.Status, a.Total, a.InProgressAt)
	}
	ok, err = s.Transition(ctx, "a", []batchstore.Status{batchstore.Validating}, batchstore.Cancelling, at(12))
	check("Transition from a wrong status", ok, err, false)
	ok, err = s.Transition(ctx, "a", []batchstore.Status{batchstore.Validating, batchstore.InProgress}, batchstore.Finalizing, at(13))
	check("Transition", ok, err, true)
	if a := mustBatch(t, s, "a"); a.Status != batchstore.Finalizing || !a.FinalizingAt.Equal(at(13)) || !a.CancellingAt.IsZero() {
		t.Errorf("after Transition: %+v", a)
	}
	errs := []batchstore.LineError{{Code: "invalid_json", Message: "line 1 is not JSON", Line: 1}}
	ok, err = s.Fail(ctx, "a", errs, at(14))
	check("Fail of an in_progress batch", ok, err, false)
	ok, err = s.Fail(ctx, "b", errs, at(15))
	check("Fail", ok, err, true)
	b := mustBatch(t, s, "b")
	if b.Status != batchstore.Failed || !b.FailedAt.Equal(at(15)) || !reflect.DeepEqual(b.Errors, errs) {
		t.Errorf("after Fail: %+v", b)
	}
	if lines, err := s.Unpublished(ctx, "b", 10); err != nil || len(lines) != 0 {
		t.Errorf("a failed batch's lines = %v, %v, want none", lines, err)
	}
	ok, err = s.Transition(ctx, "c", []batchstore.Status{batchstore.Validating}, batchstore.Cancelling, at(16))
	check("Transition to cancelling", ok, err, true)
	if _, err := s.Transition(ctx, "nope", []batchstore.Status{batchstore.Validating}, batchstore.Cancelling, at(16)); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("Transition of a missing batch = %v, want ErrNotFound", err)
	}
	if _, err := s.Transition(ctx, "d", []batchstore.Status{batchstore.Validating}, batchstore.Validating, at(16)); err == nil {
		t.Error("Transition to validating succeeded")
	}
	active, err := s.Active(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, b := range active {
		ids = append(ids, b.ID)
	}
	if want := []string{"a", "c", "d"}; !reflect.DeepEqual(ids, want) {
		t.Errorf("Active = %v, want %v", ids, want)
	}
	counts, err := s.CountByStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[batchstore.Status]int{batchstore.Finalizing: 1, batchstore.Failed: 1, batchstore.Cancelling: 1, batchstore.Validating: 1}
	if !reflect.DeepEqual(counts, want) {
		t.Errorf("CountByStatus = %v, want %v", counts, want)
	}
}

func lines(n int) []batchstore.Line {
	ls := make([]batchstore.Line, n)
	for i := range ls {
		ls[i] = batchstore.Line{Index: i, CustomID: fmt.Sprintf("req-%d", i), Request: fmt.Appendf(nil, `{"n":%d}`, i)}
	}
	return ls
}

func indexes(ls []batchstore.Line) []int {
	var is []int
	for _, l := range ls {
		is = append(is, l.Index)
	}
	return is
}

func testLines(t *testing.T, url newURL) {
	ctx := context.Background()
	s := open(t, url(t))
	if err := s.CreateBatch(ctx, newBatch("b", "alice", 0)); err != nil {
		t.Fatal(err)
	}
	ls := lines(4)
	if err := s.AddLines(ctx, "b", ls[:3]); err != nil {
		t.Fatalf("AddLines: %v", err)
	}
	var dup *batchstore.DuplicateError
	// req-1 is in the batch already: nothing of this call (req-3) is kept.
	err := s.AddLines(ctx, "b", []batchstore.Line{ls[3], {Index: 9, CustomID: "req-1", Request: []byte(`{}`)}})
	if !errors.As(err, &dup) || dup.CustomID != "req-1" {
		t.Errorf("AddLines of a custom_id in the batch = %v, want DuplicateError{req-1}", err)
	}
	err = s.AddLines(ctx, "b", []batchstore.Line{ls[3], {Index: 9, CustomID: "req-3", Request: []byte(`{}`)}})
	if !errors.As(err, &dup) || dup.CustomID != "req-3" {
		t.Errorf("AddLines of a custom_id twice = %v, want DuplicateError{req-3}", err)
	}
	if err := s.AddLines(ctx, "nope", ls[3:]); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("AddLines to a missing batch = %v, want ErrNotFound", err)
	}
	got, err := s.Unpublished(ctx, "b", 2)
	if err != nil || !reflect.DeepEqual(got, ls[:2]) {
		t.Errorf("Unpublished(2) = %v, %v, want %v", got, err, ls[:2])
	}
	for range 2 {
		if err := s.MarkPublished(ctx, "b", indexes(got)); err != nil {
			t.Fatalf("MarkPublished: %v", err)
		}
	}
	if b := mustBatch(t, s, "b"); b.Published != 2 {
		t.Errorf("Published = %d after marking 2 lines twice, want 2", b.Published)
	}
	got, err = s.Unpublished(ctx, "b", 10)
	if err != nil || !reflect.DeepEqual(got, ls[2:3]) {
		t.Errorf("Unpublished = %v, %v, want %v", got, err, ls[2:3])
	}
	if err := s.MarkPublished(ctx, "b", []int{1, 2, 7}); err != nil {
		t.Fatal(err)
	}
	if b := mustBatch(t, s, "b"); b.Published != 3 {
		t.Errorf("Published = %d, want 3", b.Published)
	}
	if got, err := s.Unpublished(ctx, "b", 10); err != nil || len(got) != 0 {
		t.Errorf("Unpublished = %v, %v, want none", got, err)
	}
}

func result(batch string, i int, ok bool) batchstore.Result {
	kind := "response"
	if !ok {
		kind = "error"
	}
	return batchstore.Result{BatchID: batch, Index: i, CustomID: fmt.Sprintf("req-%d", i), OK: ok,
		Line: fmt.Appendf(nil, `{"custom_id":"req-%d","%s":%d}`, i, kind, i)}
}

func started(t *testing.T, s *batchstore.Store, id string, n int) {
	t.Helper()
	ctx := context.Background()
	if err := s.CreateBatch(ctx, newBatch(id, "alice", 0)); err != nil {
		t.Fatal(err)
	}
	if err := s.AddLines(ctx, id, lines(n)); err != nil {
		t.Fatal(err)
	}
	if ok, err := s.Start(ctx, id, n, at(1)); !ok || err != nil {
		t.Fatalf("Start = %v, %v", ok, err)
	}
}

func record(t *testing.T, s *batchstore.Store, want int, rs ...batchstore.Result) {
	t.Helper()
	n, err := s.RecordResults(context.Background(), rs)
	if err != nil || n != want {
		t.Errorf("RecordResults = %d, %v, want %d new", n, err, want)
	}
}

func counts(t *testing.T, s *batchstore.Store, id string, completed, failed int) {
	t.Helper()
	b := mustBatch(t, s, id)
	if b.Completed != completed || b.Failed != failed {
		t.Errorf("batch %s: completed %d failed %d, want %d and %d", id, b.Completed, b.Failed, completed, failed)
	}
}

func testResults(t *testing.T, url newURL) {
	ctx := context.Background()
	s := open(t, url(t))
	started(t, s, "b", 4)
	if err := s.CreateBatch(ctx, newBatch("v", "alice", 0)); err != nil {
		t.Fatal(err)
	}
	record(t, s, 2, result("b", 0, true), result("b", 1, false), result("b", 0, true))
	record(t, s, 1, result("b", 0, true), result("b", 2, true), result("nope", 0, true), result("v", 0, true))
	// A result is keyed by custom_id: a second one, even with another
	// outcome, is the same result.
	record(t, s, 0, result("b", 1, true))
	counts(t, s, "b", 2, 1)
	counts(t, s, "v", 0, 0)
	if ok, err := s.Finalize(ctx, "b", []batchstore.Status{batchstore.InProgress}, batchstore.Completed, "out", "err", func(string) []byte { return []byte(`{}`) }, at(5)); !ok || err != nil {
		t.Fatalf("Finalize = %v, %v", ok, err)
	}
	record(t, s, 0, result("b", 3, true))
	counts(t, s, "b", 2, 2)
}

func testConcurrentResults(t *testing.T, url newURL) {
	u := url(t)
	stores := []*batchstore.Store{open(t, u)}
	if stores[0].Driver() == "postgres" {
		// Two replicas on one database.
		stores = append(stores, open(t, u))
	}
	const n, workers = 120, 8
	started(t, stores[0], "b", n)
	started(t, stores[0], "c", n)
	// Every result is sent by three workers, each in its own order and in
	// batches mixing both batches.
	var wg sync.WaitGroup
	added := make([]int, workers)
	errs := make([]error, workers)
	for w := range workers {
		var rs []batchstore.Result
		for i := range n {
			if (i+w)%workers < 3 {
				rs = append(rs, result("b", i, i%5 != 0), result("c", i, true))
			}
		}
		r := rand.New(rand.NewPCG(uint64(w), 0))
		r.Shuffle(len(rs), func(i, j int) { rs[i], rs[j] = rs[j], rs[i] })
		s := stores[w%len(stores)]
		wg.Go(func() {
			for len(rs) > 0 {
				k := min(len(rs), 7)
				m, err := s.RecordResults(context.Background(), rs[:k])
				if err != nil {
					errs[w] = err
					return
				}
				added[w] += m
				rs = rs[k:]
			}
		})
	}
	wg.Wait()
	total := 0
	for w := range workers {
		if errs[w] != nil {
			t.Fatalf("worker %d: %v", w, errs[w])
		}
		total += added[w]
	}
	if total != 2*n {
		t.Errorf("RecordResults counted %d new results in all, want %d", total, 2*n)
	}
	counts(t, stores[0], "b", n-n/5, n/5)
	counts(t, stores[0], "c", n, 0)
}

func unfinished(customID string) []byte {
	return fmt.Appendf(nil, `{"custom_id":%q,"error":"expired"}`, customID)
}

func testFinalize(t *testing.T, url newURL) {
	ctx := context.Background()
	s := open(t, url(t))
	started(t, s, "batch_x", 6)
	// 2 and 5 get no result.
	record(t, s, 4, result("batch_x", 4, false), result("batch_x", 3, true), result("batch_x", 1, false), result("batch_x", 0, true))
	from := []batchstore.Status{batchstore.InProgress, batchstore.Finalizing}
	if ok, err := s.Finalize(ctx, "batch_x", []batchstore.Status{batchstore.Cancelling}, batchstore.Cancelled, "out", "err", unfinished, at(9)); ok || err != nil {
		t.Errorf("Finalize from a wrong status = %v, %v, want false", ok, err)
	}
	if ok, err := s.Finalize(ctx, "batch_x", from, batchstore.Expired, "out", "err", unfinished, at(9)); !ok || err != nil {
		t.Fatalf("Finalize = %v, %v", ok, err)
	}
	b := mustBatch(t, s, "batch_x")
	if b.Status != batchstore.Expired || !b.ExpiredAt.Equal(at(9)) || b.OutputFileID != "out" || b.ErrorFileID != "err" {
		t.Errorf("after Finalize: %+v", b)
	}
	counts(t, s, "batch_x", 2, 4)
	wantOut := `{"custom_id":"req-0","response":0}` + "\n" + `{"custom_id":"req-3","response":3}` + "\n"
	wantErr := `{"custom_id":"req-1","error":1}` + "\n" + string(unfinished("req-2")) + "\n" +
		`{"custom_id":"req-4","error":4}` + "\n" + string(unfinished("req-5")) + "\n"
	if got := string(readFile(t, s, "out")); got != wantOut {
		t.Errorf("output file:\n%s\nwant\n%s", got, wantOut)
	}
	if got := string(readFile(t, s, "err")); got != wantErr {
		t.Errorf("error file:\n%s\nwant\n%s", got, wantErr)
	}
	for id, name := range map[string]string{"out": "batch_x_output.jsonl", "err": "batch_x_error.jsonl"} {
		f, err := s.File(ctx, id)
		if err != nil || f.Owner != "alice" || f.Purpose != "batch_output" || f.Filename != name || !f.CreatedAt.Equal(at(9)) {
			t.Errorf("File %s = %+v, %v", id, f, err)
		}
	}
	if ls, err := s.Unpublished(ctx, "batch_x", 10); err != nil || len(ls) != 0 {
		t.Errorf("lines after Finalize = %v, %v, want none", ls, err)
	}
	if ok, err := s.Finalize(ctx, "batch_x", from, batchstore.Completed, "out2", "err2", unfinished, at(10)); ok || err != nil {
		t.Errorf("Finalize twice = %v, %v, want false", ok, err)
	}
	if _, err := s.Finalize(ctx, "nope", from, batchstore.Completed, "out2", "err2", unfinished, at(10)); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("Finalize of a missing batch = %v, want ErrNotFound", err)
	}

	// All OK: no error file.
	started(t, s, "y", 2)
	record(t, s, 2, result("y", 1, true), result("y", 0, true))
	if ok, err := s.Finalize(ctx, "y", from, batchstore.Completed, "out-y", "err-y", nil, at(11)); !ok || err != nil {
		t.Fatalf("Finalize = %v, %v", ok, err)
	}
	if b := mustBatch(t, s, "y"); b.OutputFileID != "out-y" || b.ErrorFileID != "" || !b.CompletedAt.Equal(at(11)) {
		t.Errorf("after Finalize: %+v", b)
	}
	if f, err := s.File(ctx, "out-y"); err != nil || f.Filename != "batch_y_output.jsonl" {
		t.Errorf("File = %+v, %v", f, err)
	}
	if _, err := s.File(ctx, "err-y"); !errors.Is(err, batchstore.ErrNotFound) {
		t.Errorf("an empty error file exists: %v", err)
	}
	// Cancelled before any result: no output file.
	started(t, s, "z", 3)
	if ok, err := s.Transition(ctx, "z", []batchstore.Status{batchstore.InProgress}, batchstore.Cancelling, at(12)); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if ok, err := s.Finalize(ctx, "z", []batchstore.Status{batchstore.Cancelling}, batchstore.Cancelled, "out-z", "err-z", unfinished, at(13)); !ok || err != nil {
		t.Fatalf("Finalize = %v, %v", ok, err)
	}
	if b := mustBatch(t, s, "z"); b.OutputFileID != "" || b.ErrorFileID != "err-z" || b.Failed != 3 || b.Status != batchstore.Cancelled {
		t.Errorf("after Finalize: %+v", b)
	}
}

// testFinalizeLarge finalizes enough lines to span several pages of rows
// and several chunks of each file.
func testFinalizeLarge(t *testing.T, url newURL) {
	ctx := context.Background()
	s := open(t, url(t))
	const n = 1500
	started(t, s, "big", n)
	pad := strings.Repeat("x", 3000)
	var rs []batchstore.Result
	var wantOut, wantErr bytes.Buffer
	for i := range n {
		switch i % 3 {
		case 0:
			r := batchstore.Result{BatchID: "big", Index: i, CustomID: fmt.Sprintf("req-%d", i), OK: true, Line: fmt.Appendf(nil, `{"i":%d,"p":%q}`, i, pad)}
			rs = append(rs, r)
			wantOut.Write(r.Line)
			wantOut.WriteByte('\n')
		case 1:
			r := batchstore.Result{BatchID: "big", Index: i, CustomID: fmt.Sprintf("req-%d", i), Line: fmt.Appendf(nil, `{"e":%d,"p":%q}`, i, pad)}
			rs = append(rs, r)
			wantErr.Write(r.Line)
			wantErr.WriteByte('\n')
		default:
			wantErr.Write(unfinished(fmt.Sprintf("req-%d", i)))
			wantErr.WriteByte('\n')
		}
	}
	rand.New(rand.NewPCG(3, 3)).Shuffle(len(rs), func(i, j int) { rs[i], rs[j] = rs[j], rs[i] })
	record(t, s, len(rs), rs...)
	if ok, err := s.Finalize(ctx, "big", []batchstore.Status{batchstore.InProgress}, batchstore.Completed, "out", "err", unfinished, at(5)); !ok || err != nil {
		t.Fatalf("Finalize = %v, %v", ok, err)
	}
	if wantOut.Len() < 1<<20 || wantErr.Len() < 1<<20 {
		t.Fatalf("test files too small to span chunks: %d, %d", wantOut.Len(), wantErr.Len())
	}
	if got := readFile(t, s, "out"); !bytes.Equal(got, wantOut.Bytes()) {
		t.Errorf("output file differs (%d bytes, want %d)", len(got), wantOut.Len())
	}
	if got := readFile(t, s, "err"); !bytes.Equal(got, wantErr.Bytes()) {
		t.Errorf("error file differs (%d bytes, want %d)", len(got), wantErr.Len())
	}
	if f, err := s.File(ctx, "out"); err != nil || f.Bytes != int64(wantOut.Len()) {
		t.Errorf("File = %+v, %v", f, err)
	}
	counts(t, s, "big", n/3, 2*n/3)
}

func testLease(t *testing.T, url newURL) {
	s := open(t, url(t))
	steps := []struct {
		name, holder string
		ms           int
		want         bool
	}{
		{"publisher", "a", 0, true},       // free: a until 10s
		{"publisher", "b", 1000, false},   // a's
		{"publisher", "a", 5000, true},    // renewed: a until 15s
		{"publisher", "b", 14_999, false}, // still a's
		{"other", "b", 14_999, true},      // another lease
		{"publisher", "b", 15_000, true},  // a's expired: b until 25s
		{"publisher", "a", 16_000, false}, // b's now
	}
	for _, st := range steps {
		got, err := s.Lease(context.Background(), st.name, st.holder, 10*time.Second, at(st.ms))
		if err != nil || got != st.want {
			t.Errorf("Lease(%s, %s) at %dms = %v, %v, want %v", st.name, st.holder, st.ms, got, err, st.want)
		}
	}
}

// testReopen closes the store and opens it again, as a restart does.
func testReopen(t *testing.T, url newURL) {
	ctx := context.Background()
	u := url(t)
	s, err := batchstore.Open(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	content := randomBytes(1<<20+77, 4)
	if _, err := s.CreateFile(ctx, batchstore.File{ID: "f", Owner: "alice", Purpose: "batch", CreatedAt: t0}, bytes.NewReader(content), 10<<20); err != nil {
		t.Fatal(err)
	}
	started(t, s, "b", 3)
	record(t, s, 1, result("b", 1, true))
	if err := s.MarkPublished(ctx, "b", []int{0}); err != nil {
		t.Fatal(err)
	}
	want := mustBatch(t, s, "b")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, u)
	if got := mustBatch(t, s, "b"); !reflect.DeepEqual(got, want) {
		t.Errorf("after reopening: %+v, want %+v", got, want)
	}
	if got := readFile(t, s, "f"); !bytes.Equal(got, content) {
		t.Error("file changed on reopening")
	}
	// Line 1 was answered before it was marked: it is not published again.
	if ls, err := s.Unpublished(ctx, "b", 10); err != nil || !reflect.DeepEqual(indexes(ls), []int{2}) {
		t.Errorf("Unpublished after reopening = %v, %v", ls, err)
	}
	record(t, s, 0, result("b", 1, true))
	// A result that names no line of its batch is not recorded.
	record(t, s, 0, batchstore.Result{BatchID: "b", Index: 2, CustomID: "not-a-line", OK: true, Line: []byte(`{}`)})
	record(t, s, 0, batchstore.Result{BatchID: "b", Index: 7, CustomID: "req-2", OK: true, Line: []byte(`{}`)})
	if k, err := s.Known(ctx, []string{"b", "nope"}); err != nil || !k["b"] || k["nope"] {
		t.Errorf("Known = %v, %v", k, err)
	}
}

// testConcurrentOpen opens one new store several times at once, as replicas
// starting together do.
func testConcurrentOpen(t *testing.T, url newURL) {
	u := url(t)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Go(func() {
			s, err := batchstore.Open(context.Background(), u)
			if err == nil {
				err = s.Close()
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Errorf("Open: %v", err)
		}
	}
}

func TestOpenRefusesUnknownURL(t *testing.T) {
	t.Parallel()
	for _, url := range []string{"", "mysql://u:secret@db/x", "/var/lib/sous/store.db", "sqlite:"} {
		_, err := batchstore.Open(context.Background(), url)
		if err == nil {
			t.Errorf("Open(%q) succeeded", url)
			continue
		}
		if strings.Contains(err.Error(), "secret") {
			t.Errorf("Open(%q) error shows the password: %v", url, err)
		}
		if url != "sqlite:" && (!strings.Contains(err.Error(), "sqlite:PATH") || !strings.Contains(err.Error(), "postgres://")) {
			t.Errorf("Open(%q) = %v, want it to name sqlite:PATH and postgres://", url, err)
		}
	}
}
