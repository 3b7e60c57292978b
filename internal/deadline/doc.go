// Package deadline bounds contexts without a timer each: a Source shares
// one deadline context, with its one timer, among every bound taken within
// a step (a second, say). A bound taken thousands of times a second, such
// as the worker's on every settle and every engine call, then costs one
// small allocation instead of a timer, a cancel function and a place in
// the parent's list of children each.
//
// A bound from a Source ends between d and d+step after it was taken. That
// fits bounds that guard against a stuck peer (a settle's 30 seconds, an
// engine call's minutes), not timeouts a protocol depends on.
//
// Concurrency: a Source is safe for concurrent use; the contexts it returns
// are as safe as any context.
package deadline
