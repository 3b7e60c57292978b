// Package externalscaler is KEDA's external scaler gRPC service
// (externalscaler.proto), as KEDA v2.21.0 ships it in
// github.com/kedacore/keda/v2/pkg/scalers/externalscaler: the .proto and
// the code protoc-gen-go and protoc-gen-go-grpc generated from it, copied
// unchanged (Apache License 2.0, as KEDA) so that the scaler does not pull
// KEDA's whole module into sous's. To update, copy the three files from
// the KEDA release the integration tests run (integration/k8s/tools/keda).
package externalscaler
