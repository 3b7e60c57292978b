// Package fleet is what workers tell the scaler about the work they can
// do, and how the scaler turns queued requests into seconds of work.
//
// Every SOUS_REPORT_INTERVAL each worker publishes one Report per lane to
// the fanout exchange Exchange (RabbitMQ; non-persistent, expiring after
// ReportTTL: a report is worth only its freshness). The scaler keeps the
// latest report of each worker and lane (View) and prices a lane's queued
// request at Cost: the seconds one replica spends on it, its mean service
// time divided by the requests it runs at once.
package fleet

import (
	"encoding/json"
	"fmt"
	"time"
)

// Exchange is the fanout exchange reports go to.
const Exchange = "sous.reports"

// ReportTTL is how long a report counts: three missed reports and a
// worker is gone from the scaler's view.
const ReportTTL = 30 * time.Second

// Report is one worker's measure of one lane.
type Report struct {
	Worker string    `json:"worker"`
	Lane   string    `json:"lane"`
	Queue  string    `json:"queue"`
	At     time.Time `json:"at"`
	// Limit is the worker's in-flight limit: requests on the engine at
	// once, all lanes.
	Limit int `json:"limit"`
	// InFlight is the lane's requests the worker holds (received, not
	// settled): with RabbitMQ's ready count, what the queue really holds.
	InFlight int `json:"in_flight"`
	// ServedPerS and OutputTokensPerS are the lane's completions and
	// output tokens per second, smoothed over about a minute.
	ServedPerS       float64 `json:"served_per_s"`
	OutputTokensPerS float64 `json:"output_tokens_per_s"`
	// MeanServiceS is the lane's mean time on the engine per request,
	// smoothed over about a minute; 0 before the first completion.
	MeanServiceS float64 `json:"mean_service_s"`
}

// Cost is the seconds one replica spends per request of the report's
// lane: its mean service time over the requests it runs at once. ok is
// false before the worker has measured anything.
func (r Report) Cost() (float64, bool) {
	if r.MeanServiceS <= 0 || r.Limit <= 0 {
		return 0, false
	}
	return r.MeanServiceS / float64(r.Limit), true
}

// Decode reads a report and checks it.
func Decode(b []byte) (Report, error) {
	var r Report
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("report: %w", err)
	}
	if r.Worker == "" || r.Queue == "" || r.At.IsZero() {
		return r, fmt.Errorf("report: worker, queue and at are required")
	}
	if r.Limit < 0 || r.InFlight < 0 || r.MeanServiceS < 0 || r.ServedPerS < 0 {
		return r, fmt.Errorf("report: negative figures")
	}
	return r, nil
}
