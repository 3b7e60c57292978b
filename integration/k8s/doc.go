// Package k8s runs a real Kubernetes control plane and the real KEDA
// operator on loopback, for tests that apply the project's own manifests
// (deploy/) and watch what Kubernetes and KEDA do with them.
//
// The binaries are built from their Go modules by scripts/build-k8s.sh
// (`make k8s`, which `make test` runs) into .cache/k8s/bin: etcd (embedded
// server, tools/controlplane/etcd), kube-apiserver and
// kube-controller-manager (k8s.io/kubernetes, tools/controlplane), the
// KEDA operator and KEDA's metrics apiserver (github.com/kedacore/keda/v2,
// tools/keda; the adapter is KEDA's cmd/adapter/main.go with its /metrics
// listener moved from every interface to 127.0.0.1, the only change), and
// helm (helm.sh/helm/v3, tools/helm), which installs deploy/helm/sous,
// then kube-scheduler and the kubelet (tools/node, the control plane's
// release). Each wrapper is a module of its own, so the project's go.mod
// carries none of them. Cold, the control plane and KEDA take about 17
// minutes on 2 idle cores (30 measured on the shared 2-core machine, at
// nice 19 beside other builds), helm and the node a few more; seconds once
// built. scripts/build-k8s.sh has the figure per binary.
//
// Most tests run no kubelet and no scheduler: pods are created by the
// ReplicaSet controller and stay Pending, which is all they need, since
// KEDA and the HPA change a Deployment's replicas and the ReplicaSet
// controller picks which pods to delete.
//
// The node tests (TestNode*, docs/design/kubelet.md) add nodes:
// StartNode runs a private containerd with the CRI plugin, kube-scheduler
// (on the cluster's first node) and a kubelet on loopback, loads images
// from the local Docker engine and a pause image built here (./pause), and
// returns once the node is Ready; pods use host networking, so a
// Deployment of N replicas needs N nodes (127.0.0.1 … 127.0.0.N). They
// need root, `make k8s`, `make images` and Debian's containerd, runc and
// containernetworking-plugins (scripts/ensure-node.sh, which CI runs);
// NeedNode skips the test with the reason where one is missing, and fails
// it under CI=true. SOUS_K8S_NODE=0 turns them off, also under CI=true.
// A host lock (/run/sous-k8s-node.lock) lets one process's node tests run
// at a time. The node's teardown runs before the control plane's: it
// deletes the pods, stops its processes, removes left containers, mounts
// and empty kubepods cgroups, and restores the kernel tunables the kubelet
// sets.
//
// 1 ↔ N runs as in a cluster: the apiserver has the aggregation layer on
// (front-proxy CA, --proxy-client-cert-file, --requestheader-* flags),
// StartKEDAAdapter runs KEDA's adapter on a loopback port and registers
// the APIService v1beta1.external.metrics.k8s.io for it, and
// kube-controller-manager runs the HPA controller (HPAController) with the
// admin's credentials. The APIService's Service is of type ExternalName
// with externalName 127.0.0.1: without --enable-aggregator-routing the
// apiserver resolves it with k8s.io/apiserver/pkg/util/proxy.ResolveCluster,
// which for ExternalName returns https://127.0.0.1:<APIService port>, so
// no ClusterIP, kube-proxy or endpoints are needed. The adapter reaches the
// operator's gRPC metrics service on its loopback port with mutual TLS
// (one certificate for both, signed by the test CA).
//
// Service Bus scaling stops at KEDA's scaler: KEDA's azure-servicebus
// scaler reads ActiveMessageCount with the Service Bus admin client, an
// HTTPS ATOM GET https://<namespace>/<queue>?api-version=2021-05, and
// sbpeer, the project's Service Bus double, speaks AMQP 1.0 only; and
// workload identity needs Azure AD. TestServiceBusScaledObjectAccepted
// records both errors.
//
// When the binaries are missing, NeedControlPlane, NeedKEDA and
// NeedKEDAAdapter skip the test with one line naming `make k8s`, except
// under CI=true, where the test fails: CI runs `make test`, which builds
// them.
//
// A ControlPlane belongs to one test; Start registers its teardown with
// t.Cleanup, which stops every process it started and waits for it.
package k8s
