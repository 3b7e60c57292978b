// Package deploy holds the container image and Kubernetes deployment of sous:
// the Dockerfile's checks, the kustomize base and overlays under k8s/, the KEDA
// objects under keda/, README.md (the user's guide, and why each choice) and
// TESTING.md (how all of it is tested, and what the tests found).
//
// The package has no code of its own. Its tests validate every manifest
// offline, the way an API server with KEDA installed would, and keep the
// Dockerfile in step with the Makefile: core objects are decoded strictly into
// k8s.io/api types, KEDA objects are checked against the CRD schemas and the
// scaler metadata schema in ../shared/schemas/keda, the overlays are rendered
// with kustomize, and the sous-specific rules (GPU limit, grace period, scale
// to zero) are checked on the rendered objects. Each check has a test that
// breaks a copy of a good file and expects the check to refuse it.
//
// Concurrency: nothing here runs outside tests.
package deploy
