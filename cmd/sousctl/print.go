package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/sous-run/sous/internal/wire"
)

// printer writes what comes back. In JSON mode stdout holds exactly the
// chunk and result bodies, one per line. In text mode each result is a
// header line and its content indented below it; streamed text is printed
// once, under its request's header: one stream is shown live, the others
// are held until it ends, so texts never interleave. Progress ("3 of 10
// results") goes to stderr when more than a few results are awaited: in
// place on a terminal, as plain lines at each quarter otherwise.
//
// A printer is used by one goroutine.
type printer struct {
	out, errw io.Writer
	json      bool
	tty       bool // stderr is a terminal

	total, arrived int
	quarter        int  // the last quarter reported on plain lines
	drawn          bool // a progress line is on the terminal

	live    string                 // the stream shown as it arrives; "" when none
	held    map[string]*heldStream // streams waiting for their turn
	order   []string               // held streams, by first chunk
	atStart bool                   // the live text is at the start of a line
}

// heldStream is a request whose output waits for the live stream to end:
// a stream's text so far, or a finished result.
type heldStream struct {
	text     strings.Builder
	restarts int
	done     *wire.Result // set when its result arrived
	streamed bool
}

// progressFrom is the number of awaited results from which progress shows.
const progressFrom = 4

func newPrinter(stdout, stderr io.Writer, jsonOut bool, total int) *printer {
	return &printer{out: stdout, errw: stderr, json: jsonOut, tty: isTerminal(stderr), total: total, held: map[string]*heldStream{}}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func (p *printer) published(n int, queue string) {
	if !p.json {
		fmt.Fprintf(p.out, "published %d request(s) to %s; waiting for results…\n", n, queue)
	}
}

// chunk prints or holds one piece of a stream.
func (p *printer) chunk(id string, body []byte) {
	if p.json {
		fmt.Fprintln(p.out, string(body))
		return
	}
	var c wire.Chunk
	if json.Unmarshal(body, &c) != nil {
		return
	}
	if p.live == "" {
		p.startLive(id)
	}
	if id != p.live {
		h := p.held[id]
		if h == nil {
			h = &heldStream{}
			p.held[id] = h
			p.order = append(p.order, id)
		}
		if c.Restart {
			h.text.Reset()
			h.restarts = c.Attempt
		}
		h.text.WriteString(c.Delta)
		return
	}
	if c.Restart {
		p.endText()
		fmt.Fprintf(p.out, "  (stream restarted, attempt %d)\n", c.Attempt)
	}
	p.writeText(c.Delta)
}

// startLive makes id the stream shown as it arrives: its header, then
// what was held of it.
func (p *printer) startLive(id string) {
	p.clearProgress()
	p.live, p.atStart = id, true
	fmt.Fprintf(p.out, "[%s] streaming\n", id)
	if h := p.held[id]; h != nil {
		if h.restarts > 0 {
			fmt.Fprintf(p.out, "  (stream restarted, attempt %d)\n", h.restarts)
		}
		p.writeText(h.text.String())
		p.drop(id)
	}
}

// writeText writes streamed text indented under its header.
func (p *printer) writeText(s string) {
	for s != "" {
		if p.atStart {
			io.WriteString(p.out, "  ")
			p.atStart = false
		}
		line, rest, nl := strings.Cut(s, "\n")
		io.WriteString(p.out, line)
		if nl {
			io.WriteString(p.out, "\n")
			p.atStart = true
		}
		s = rest
	}
}

// endText ends the live text's last line.
func (p *printer) endText() {
	if !p.atStart {
		io.WriteString(p.out, "\n")
		p.atStart = true
	}
}

func (p *printer) drop(id string) {
	delete(p.held, id)
	for i, o := range p.order {
		if o == id {
			p.order = append(p.order[:i], p.order[i+1:]...)
			break
		}
	}
}

// result prints one final result, or holds it while another stream is
// shown live.
func (p *printer) result(id string, body []byte, r wire.Result, streamed bool) {
	p.arrived++
	if p.json {
		fmt.Fprintln(p.out, string(body))
		p.progress()
		return
	}
	p.clearProgress()
	switch {
	case streamed && id == p.live:
		p.endText()
		printSummary(p.out, r)
		p.live = ""
	case p.live != "":
		h := p.held[id]
		if h == nil {
			h = &heldStream{}
			p.held[id] = h
			p.order = append(p.order, id)
		}
		h.done, h.streamed = &r, streamed
	default:
		p.printWhole(id, r, streamed)
	}
	p.next()
	p.progress()
}

// next prints the held requests that finished, in order, until one that is
// still streaming: that one goes live.
func (p *printer) next() {
	for p.live == "" && len(p.order) > 0 {
		id := p.order[0]
		h := p.held[id]
		if h.done == nil {
			p.startLive(id)
			return
		}
		p.printWhole(id, *h.done, h.streamed)
	}
}

// printWhole prints a finished request: a stream's held text under its
// header then its summary, or a whole result.
func (p *printer) printWhole(id string, r wire.Result, streamed bool) {
	h := p.held[id]
	p.drop(id)
	if !streamed || h == nil || h.text.Len() == 0 {
		// Not streamed, or a stream that ended before its first chunk
		// (an error): the whole result is here.
		printResult(p.out, r)
		return
	}
	fmt.Fprintf(p.out, "[%s] streaming\n", id)
	if h.restarts > 0 {
		fmt.Fprintf(p.out, "  (stream restarted, attempt %d)\n", h.restarts)
	}
	p.atStart = true
	p.writeText(h.text.String())
	p.endText()
	printSummary(p.out, r)
}

// endLine ends a live text cut short (timeout, interrupt) and the
// progress line, so that a message on stderr starts on its own line.
func (p *printer) endLine() {
	if p.live != "" {
		p.endText()
	}
	p.clearProgress()
}

func (p *printer) progress() {
	if p.total < progressFrom {
		return
	}
	if p.tty {
		if p.live != "" { // the live text owns the terminal's line
			return
		}
		fmt.Fprintf(p.errw, "\r\033[K%d of %d results", p.arrived, p.total)
		p.drawn = true
		if p.arrived == p.total {
			p.clearProgress()
		}
		return
	}
	if q := p.arrived * 4 / p.total; q > p.quarter {
		p.quarter = q
		fmt.Fprintf(p.errw, "sousctl: %d of %d results\n", p.arrived, p.total)
	}
}

func (p *printer) clearProgress() {
	if p.drawn {
		fmt.Fprint(p.errw, "\r\033[K")
		p.drawn = false
	}
}

// printResult prints a result whose content is in it: a header line, then
// the content of its kind, then its notes and token counts.
func printResult(w io.Writer, r wire.Result) {
	fmt.Fprintf(w, "[%s] %s\n", r.ID, details(r))
	printContent(w, r)
	printFooter(w, r)
}

// printSummary ends a streamed result, whose text was printed as it came:
// its status and timing, then errors, notes and token counts.
func printSummary(w io.Writer, r wire.Result) {
	fmt.Fprintf(w, "  %s\n", details(r))
	if r.Error != nil {
		printError(w, r.Error)
	}
	printToolCalls(w, r) // tools.go: a streamed answer's calls come whole
	printFooter(w, r)
}

// details is the status, model, timing, batch and worker of a result.
func details(r wire.Result) string {
	batch := ""
	if r.Batch != nil {
		batch = fmt.Sprintf(", batch %s of %d", r.Batch.ID, r.Batch.Size)
	}
	lane := ""
	if r.Lane != "" {
		lane = " lane=" + r.Lane
	}
	return fmt.Sprintf("%s model=%s%s queue=%dms wait=%dms inference=%dms%s worker=%s", r.Status, r.Model, lane, r.Timing.QueueMS, r.Timing.BatchWaitMS, r.Timing.InferenceMS, batch, r.Worker)
}

// printContent prints what a result carries, by kind: one function each.
func printContent(w io.Writer, r wire.Result) {
	switch {
	case r.Error != nil:
		printError(w, r.Error)
	case r.Message != nil:
		if r.Message.Content != "" || len(r.Message.ToolCalls) == 0 {
			printMessage(w, r.Message.Role, r.Message.Content)
		}
		printToolCalls(w, r) // tools.go
	case r.Response != nil:
		printResponse(w, *r.Response)
	case r.Embeddings != nil:
		printEmbeddings(w, r.Embeddings)
	}
}

func printError(w io.Writer, e *wire.ErrorInfo) {
	fmt.Fprintf(w, "  error %s: %s\n", e.Code, e.Message)
}

func printResponse(w io.Writer, text string) {
	fmt.Fprintf(w, "  %s\n", indent(text))
}

func printMessage(w io.Writer, role, content string) {
	fmt.Fprintf(w, "  %s: %s\n", role, indent(content))
}

func printEmbeddings(w io.Writer, vectors [][]float32) {
	dims := 0
	if len(vectors) > 0 {
		dims = len(vectors[0])
	}
	fmt.Fprintf(w, "  %d embedding(s) of %d dimensions\n", len(vectors), dims)
}

func printFooter(w io.Writer, r wire.Result) {
	for _, n := range r.Notes {
		fmt.Fprintf(w, "  note: %s\n", n)
	}
	if r.Usage != nil {
		fmt.Fprintf(w, "  tokens in=%d out=%d done=%s\n", r.Usage.InputTokens, r.Usage.OutputTokens, r.DoneReason)
	}
}

func indent(s string) string { return strings.ReplaceAll(s, "\n", "\n  ") }
