// Package scaler is sous's KEDA external scaler: it answers KEDA's
// ExternalScaler gRPC service (package externalscaler) with the seconds of
// work the queues hold, so that the fleet scales on what its requests
// cost, not on how many there are.
//
// A trigger's metadata names its queues (queue: one, or a comma-separated
// list of lane queues) and its goal (targetDrainSeconds: how long one
// replica may take to drain its part). GetMetricSpec answers the goal and
// GetMetrics the seconds one replica would need to drain what the queues
// hold: for each queue, the requests it holds (ready, and held by workers)
// times the cost of one (fleet.View: the workers' measured mean service
// time over the requests one runs at once; the last cost seen when no
// worker runs; else the prior). KEDA's external metrics are averaged over
// the replicas, so the HPA asks for ceil(seconds / targetDrainSeconds).
// Deadlines can only raise it: producers that know when their queued work
// is due (the Batch API's gateway) say so in a fleet.Demand on the reports
// exchange, and the answer is at least fleet.DeadlineReplicas ×
// targetDrainSeconds, the replicas that finish each deadline's work
// Config.DeadlineMargin before it. IsActive is true as soon as any queue
// holds a request.
package scaler
