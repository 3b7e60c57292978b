package ollama

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"

	"github.com/sous-run/sous/internal/inference"
)

// maxLine bounds one NDJSON line from the engine. The official client
// allocates an 8 MiB scanner buffer for every call, which at a batch of 32
// is 256 MiB at once; this reader grows a pooled buffer only as far as a
// line needs.
const maxLine = 8 << 20

var readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 64<<10) }}

// stream POSTs body to path and calls fn with each NDJSON line of the
// answer. An error line, in-stream or with a failing status, becomes a
// classified error.
func (e *Engine) stream(ctx context.Context, path string, body any, fn func([]byte) error) error {
	b, err := json.Marshal(body)
	if err != nil {
		return &inference.Error{Kind: inference.Permanent, Code: "engine_rejected", Err: err}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.base+path, bytes.NewReader(b))
	if err != nil {
		return &inference.Error{Kind: inference.Permanent, Code: "engine_rejected", Err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := e.http.Do(req)
	if err != nil {
		return inference.Classify(0, "", err)
	}
	defer resp.Body.Close()
	r := readers.Get().(*bufio.Reader)
	r.Reset(resp.Body)
	defer func() { r.Reset(nil); readers.Put(r) }()
	var line []byte
	for {
		line, err = readLine(r, line[:0])
		if len(bytes.TrimSpace(line)) > 0 {
			var e struct {
				Error string `json:"error"`
			}
			if jerr := json.Unmarshal(line, &e); jerr != nil {
				if resp.StatusCode >= 400 {
					return classifyStatus(resp.StatusCode, string(truncate(line)))
				}
				return inference.Classify(0, "", fmt.Errorf("ollama: answer is not JSON: %w", jerr))
			}
			if e.Error != "" || resp.StatusCode >= 400 {
				status := resp.StatusCode
				if status < 400 {
					status = http.StatusInternalServerError // an error mid-stream
				}
				return classifyStatus(status, e.Error)
			}
			if ferr := fn(line); ferr != nil {
				return ferr
			}
		}
		if errors.Is(err, io.EOF) {
			if resp.StatusCode >= 400 {
				return classifyStatus(resp.StatusCode, resp.Status)
			}
			return nil
		}
		if err != nil {
			return inference.Classify(0, "", fmt.Errorf("ollama: read the answer: %w", err))
		}
	}
}

// readLine appends one line (without its newline) to buf.
func readLine(r *bufio.Reader, buf []byte) ([]byte, error) {
	for {
		part, err := r.ReadSlice('\n')
		buf = append(buf, part...)
		if len(buf) > maxLine {
			return buf[:0], fmt.Errorf("a line of the answer is over %d bytes", maxLine)
		}
		if err == bufio.ErrBufferFull {
			continue
		}
		return bytes.TrimSuffix(buf, []byte("\n")), err
	}
}

func classifyStatus(status int, msg string) *inference.Error {
	return inference.Classify(status, msg, errors.New("ollama: "+msg))
}

func truncate(b []byte) []byte {
	if len(b) > 300 {
		return b[:300]
	}
	return b
}
