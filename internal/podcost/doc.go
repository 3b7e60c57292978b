// Package podcost keeps the worker's own Pod annotation
// controller.kubernetes.io/pod-deletion-cost current, so that when KEDA or
// the HPA shrinks the Deployment, the ReplicaSet controller deletes idle
// workers before busy ones (it deletes the pods with the lowest cost first,
// after unscheduled, pending and not-ready ones).
//
// The cost is 0 while the worker holds no work and the number of
// deliveries in flight while it does, so the busiest worker is removed
// last. A Keeper reads that number from a func the worker gives
// (worker.(*Worker).InFlight) and patches the Pod with a JSON merge patch
// through client-go, at most once per MinInterval, and at once when an idle
// worker becomes busy (that change is the one a scale-in must not miss).
//
// It fails soft: a refused or failed patch is logged (once per failure
// streak) and retried later; it never stops the worker. The Pod's name and
// namespace come from the downward API; the patch needs a Role that allows
// "patch" on "pods" (deploy/k8s/base/role.yaml).
//
// Concurrency: Run owns the Keeper's state; call it once, from one
// goroutine. It returns when its context ends.
package podcost
