// Package wire is the JSON contract between producers and sous: it decodes
// and validates request bodies and encodes results and stream chunks.
// docs/messages.md documents the contract and docs/schemas/ holds its JSON
// Schemas, which the tests check the encoder and decoder against.
//
// Everything here is pure and safe for concurrent use. The decoder treats its
// input as hostile: it bounds size, rejects invalid UTF-8, unknown fields and
// wrongly typed options, and never panics (FuzzDecodeRequest). A rejected
// request still gives back the producer's id when a bounded scan can read it,
// so that its error result carries it.
package wire
