// Package fleetsim replays a day of mixed traffic through a simulated sous
// fleet and the autoscaling that drives it, to compare scaling designs on
// the same requests: KEDA's message-count trigger against sous's scaler,
// which answers seconds of queued work (internal/scaler).
//
// Everything is pure computation on a simulated clock (seconds as
// float64 from the start of the day): no goroutines, no wall clock, no
// randomness but the seeded generator, so the same seed gives the same
// numbers on any machine. The parts:
//
//   - Generate: the traffic (interactive Poisson arrivals with a diurnal
//     rate, bulk jobs with deadlines and heavy-tailed answers);
//   - HPA: Kubernetes' horizontal pod autoscaler step for AverageValue
//     external metrics (tolerance, stabilisation windows, scaling
//     policies), as KEDA configures it;
//   - Run: the fleet (replicas of 32 slots with sous's lanes, pod start
//     time, scale-in that drains), KEDA's activation 0↔1 and the HPA's
//     sync loop, for one Design.
//
// Nothing here is safe for concurrent use; each Run owns its state.
package fleetsim
