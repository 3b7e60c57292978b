package k8s

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"

	"github.com/sous-run/sous/internal/podcost"
)

const workerSelector = "app.kubernetes.io/name=sous,app.kubernetes.io/component=worker"

// TestScaleInKeepsTheBusyWorker: three worker pods of the project's own
// Deployment, two idle and one busy; the Deployment shrinks to two and the
// real ReplicaSet controller deletes an idle one, because each pod's
// internal/podcost Keeper (what the worker runs) set its
// pod-deletion-cost, patching as the pod's own ServiceAccount under the
// project's Role. The busy one is always the newest pod, the one the
// controller removes first among equals; the same rounds without the
// annotation show it then goes.
func TestScaleInKeepsTheBusyWorker(t *testing.T) {
	b := NeedControlPlane(t)
	cp := Start(t, b, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// The rabbitmq overlay as it ships, less the KEDA objects (no KEDA
	// here: the test sets the replicas itself, as the HPA would).
	rendered, err := Kustomize("deploy/k8s/overlays/rabbitmq", nil)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Decode(rendered)
	if err != nil {
		t.Fatal(err)
	}
	objs = slices.DeleteFunc(objs, func(o *unstructured.Unstructured) bool { return o.GroupVersionKind().Group == "keda.sh" })
	if err := cp.ApplyObjects(ctx, objs); err != nil {
		t.Fatal(err)
	}

	// The worker's credentials: a token of its ServiceAccount, bound to
	// the project's Role only.
	tok, err := cp.Client.CoreV1().ServiceAccounts(rabbitNS).CreateToken(ctx, "sous-worker", &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	workerCfg := rest.CopyConfig(cp.Config)
	workerCfg.BearerToken = tok.Status.Token
	workerClient, err := kubernetes.NewForConfig(workerCfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := workerClient.CoreV1().Pods(rabbitNS).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("the worker's account may list pods (err %v); its Role must allow only patch", err)
	}
	if _, err := workerClient.AppsV1().Deployments(rabbitNS).Get(ctx, "sous-worker", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("the worker's account may read deployments (err %v)", err)
	}

	const rounds = 3
	for _, annotate := range []bool{true, false} {
		busyDeleted := 0
		for round := range rounds {
			pods := scaleTo(t, ctx, cp, 3)
			// The busy one is the newest pod: the one the controller deletes
			// first among equals (newer before older), so the one most at
			// risk. From round 2 on it is the pod the last scale-up made.
			busy := newest(pods)
			if annotate {
				for _, p := range pods {
					inFlight := 0
					if p.Name == busy {
						inFlight = 96
					}
					k, err := podcost.New(podcost.Config{Namespace: rabbitNS, Name: p.Name, InFlight: func() int { return inFlight }}, workerClient, slog.New(slog.DiscardHandler))
					if err != nil {
						t.Fatal(err)
					}
					k.Sync(ctx)
				}
				waitAnnotations(t, ctx, cp, busy)
			} else {
				clearAnnotations(t, ctx, cp, pods)
			}
			left := scaleTo(t, ctx, cp, 2)
			deleted := gone(pods, left)
			busyGone := deleted == busy
			if busyGone {
				busyDeleted++
			}
			t.Logf("k8s: annotations=%v round %d: pods %s, busy %s; scale 3 -> 2 deleted %s (busy deleted: %v)", annotate, round+1, names(pods), busy, deleted, busyGone)
			if annotate && busyGone {
				t.Fatalf("round %d: the busy worker %s was deleted despite its pod-deletion-cost\n%s", round+1, busy, cp.Logs(30))
			}
		}
		if annotate {
			t.Logf("k8s: SCALE-IN with pod-deletion-cost: the busy worker was kept in %d of %d rounds", rounds, rounds)
		} else {
			t.Logf("k8s: SCALE-IN without pod-deletion-cost: the busy (newest) worker was deleted in %d of %d rounds (the ReplicaSet controller cannot tell it is busy: among equal pods it deletes the newest first, by creation time on a log scale, then UID)", busyDeleted, rounds)
		}
	}
}

// scaleTo sets the Deployment's replicas through its scale subresource (as
// the HPA does) and waits until it has n live pods; it returns them sorted
// by name.
func scaleTo(t *testing.T, ctx context.Context, cp *ControlPlane, n int32) []corev1.Pod {
	t.Helper()
	deps := cp.Client.AppsV1().Deployments(rabbitNS)
	// The Deployment controller writes the object too (status): retry on
	// a conflict, as the HPA does.
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		sc, err := deps.GetScale(ctx, "sous-worker", metav1.GetOptions{})
		if err != nil {
			return err
		}
		sc.Spec.Replicas = n
		_, err = deps.UpdateScale(ctx, "sous-worker", sc, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		list, err := cp.Client.CoreV1().Pods(rabbitNS).List(ctx, metav1.ListOptions{LabelSelector: workerSelector})
		if err != nil {
			t.Fatal(err)
		}
		live := slices.DeleteFunc(list.Items, func(p corev1.Pod) bool { return p.DeletionTimestamp != nil })
		if len(live) == int(n) {
			slices.SortFunc(live, func(a, b corev1.Pod) int {
				if a.Name < b.Name {
					return -1
				}
				return 1
			})
			return live
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d pods, want %d\n%s", len(live), n, cp.Logs(30))
		}
		sleep(ctx, 100*time.Millisecond)
	}
}

// waitAnnotations waits until the ReplicaSet controller's view can have
// the costs: every pod carries the annotation, the busy one above 0.
func waitAnnotations(t *testing.T, ctx context.Context, cp *ControlPlane, busy string) {
	t.Helper()
	list, err := cp.Client.CoreV1().Pods(rabbitNS).List(ctx, metav1.ListOptions{LabelSelector: workerSelector})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range list.Items {
		want := "0"
		if p.Name == busy {
			want = "96"
		}
		if got, ok := p.Annotations[podcost.Annotation]; !ok || got != want {
			t.Fatalf("pod %s: %s = %q, want %q", p.Name, podcost.Annotation, got, want)
		}
	}
	// The controller reads pods from its informer cache; give the watch
	// event a moment to arrive there (it is milliseconds on loopback).
	sleep(ctx, 500*time.Millisecond)
}

func clearAnnotations(t *testing.T, ctx context.Context, cp *ControlPlane, pods []corev1.Pod) {
	t.Helper()
	for _, p := range pods {
		body := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:null}}}`, podcost.Annotation)
		if _, err := cp.Client.CoreV1().Pods(rabbitNS).Patch(ctx, p.Name, "application/merge-patch+json", body, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	sleep(ctx, 500*time.Millisecond)
}

// newest is the name of the most recently created pod (ties: the first by
// name).
func newest(pods []corev1.Pod) string {
	n := pods[0]
	for _, p := range pods[1:] {
		if p.CreationTimestamp.After(n.CreationTimestamp.Time) {
			n = p
		}
	}
	return n.Name
}

func gone(before, after []corev1.Pod) string {
	for _, b := range before {
		if !slices.ContainsFunc(after, func(a corev1.Pod) bool { return a.Name == b.Name }) {
			return b.Name
		}
	}
	return ""
}

func names(pods []corev1.Pod) []string {
	var out []string
	for _, p := range pods {
		out = append(out, p.Name)
	}
	return out
}
