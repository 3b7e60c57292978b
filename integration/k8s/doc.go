// Package k8s runs a real Kubernetes control plane and the real KEDA
// operator on loopback, for tests that apply the project's own manifests
// (deploy/) and watch what Kubernetes and KEDA do with them.
//
// The binaries are built from their Go modules by scripts/build-k8s.sh
// (`make k8s`, which `make test` runs) into .cache/k8s/bin: etcd (embedded
// server, tools/controlplane/etcd), kube-apiserver and
// kube-controller-manager (k8s.io/kubernetes, tools/controlplane) and the
// KEDA operator (github.com/kedacore/keda/v2, tools/keda). Each wrapper is a
// module of its own, so the project's go.mod carries none of them.
//
// There is no kubelet and no scheduler: pods are created by the
// ReplicaSet controller and stay Pending, which is all these tests need,
// since KEDA and the HPA change a Deployment's replicas and the ReplicaSet
// controller picks which pods to delete.
//
// When the binaries are missing, NeedControlPlane and NeedKEDA skip the
// test with one line naming `make k8s`, except under CI=true, where the
// test fails: CI runs `make test`, which builds them.
//
// A ControlPlane belongs to one test; Start registers its teardown with
// t.Cleanup, which stops every process it started and waits for it.
package k8s
