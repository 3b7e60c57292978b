package batchstore_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sous-run/sous/internal/gateway/batchstore"
)

func Example() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "batchstore-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	s, err := batchstore.Open(ctx, "sqlite:"+filepath.Join(dir, "batches.db"))
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()

	now := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	input := `{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}` + "\n"
	f, err := s.CreateFile(ctx, batchstore.File{ID: "file-1", Purpose: "batch", Filename: "in.jsonl", CreatedAt: now},
		strings.NewReader(input), 200<<20)
	if err != nil {
		log.Fatal(err)
	}
	b := batchstore.Batch{ID: "batch_1", Endpoint: "/v1/chat/completions", InputFileID: f.ID,
		CompletionWindow: "24h", Queue: "sous.requests", Status: batchstore.Validating, CreatedAt: now}
	if err := s.CreateBatch(ctx, b); err != nil {
		log.Fatal(err)
	}
	if err := s.AddLines(ctx, b.ID, []batchstore.Line{{Index: 0, CustomID: "a", Request: []byte(`{}`)}}); err != nil {
		log.Fatal(err)
	}
	if _, err := s.Start(ctx, b.ID, 1, now); err != nil {
		log.Fatal(err)
	}
	// A worker's answer arrives.
	if _, err := s.RecordResults(ctx, []batchstore.Result{{BatchID: b.ID, Index: 0, CustomID: "a", OK: true,
		Line: []byte(`{"custom_id":"a","response":{"status_code":200}}`)}}); err != nil {
		log.Fatal(err)
	}
	if _, err := s.Finalize(ctx, b.ID, []batchstore.Status{batchstore.InProgress}, batchstore.Completed,
		"file-out", "file-err", nil, now.Add(time.Minute)); err != nil {
		log.Fatal(err)
	}
	b, err = s.Batch(ctx, b.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(b.Status, b.Completed, b.Failed, b.OutputFileID, b.ErrorFileID == "")
	out, err := s.OpenFile(ctx, b.OutputFileID)
	if err != nil {
		log.Fatal(err)
	}
	defer out.Close()
	io.Copy(os.Stdout, out)
	// Output:
	// completed 1 0 file-out true
	// {"custom_id":"a","response":{"status_code":200}}
}
