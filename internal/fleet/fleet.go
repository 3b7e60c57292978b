// Package fleet is what workers tell the scaler about the work they can
// do, and how the scaler turns queued requests into seconds of work.
//
// Every SOUS_REPORT_INTERVAL each worker publishes one Report per lane to
// the fanout exchange Exchange (RabbitMQ; non-persistent, expiring after
// ReportTTL: a report is worth only its freshness). The scaler keeps the
// latest report of each worker and lane (View) and prices a lane's queued
// request at Cost: the seconds one replica spends on it, its mean service
// time divided by the requests it runs at once.
//
// Producers that know when their queued work is due (the Batch API's
// gateway) publish a Demand to the same exchange; the View keeps the
// latest of each source and queue, and DeadlineReplicas turns a queue's
// due list into the replicas that finish it in time.
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

// Demand is what a producer knows of the work it has queued: the Batch
// API's gateway publishes one for each lane queue its running batches
// use, every few seconds, to Exchange. Due lists the requests still to
// answer by each deadline (each batch's expires_at), earliest first. The
// scaler raises a lane's metric so that the fleet can finish each
// deadline's work in time; deadlines can only raise it.
type Demand struct {
	Kind   string    `json:"kind"` // KindDemand
	Source string    `json:"source"`
	Queue  string    `json:"queue"`
	At     time.Time `json:"at"`
	Due    []Due     `json:"due"`
}

// Due is work due by a deadline.
type Due struct {
	By       time.Time `json:"by"`
	Requests int       `json:"requests"`
}

// KindDemand marks a Demand on the exchange; a Report has no kind.
const KindDemand = "demand"

// DecodeDemand reads a demand and checks it.
func DecodeDemand(b []byte) (Demand, error) {
	var d Demand
	if err := json.Unmarshal(b, &d); err != nil {
		return d, fmt.Errorf("demand: %w", err)
	}
	if d.Kind != KindDemand || d.Source == "" || d.Queue == "" || d.At.IsZero() {
		return d, fmt.Errorf("demand: kind %q, source, queue and at are required", KindDemand)
	}
	for _, u := range d.Due {
		if u.Requests < 0 || u.By.IsZero() {
			return d, fmt.Errorf("demand: a due entry needs a time and no negative count")
		}
	}
	return d, nil
}

// IsDemand says whether a message on Exchange is a Demand (else a Report).
func IsDemand(b []byte) bool {
	var k struct {
		Kind string `json:"kind"`
	}
	return json.Unmarshal(b, &k) == nil && k.Kind == KindDemand
}
