//! The shard's upstream WebSocket client (`sluice_shard::wsin`): the fuzz
//! input is everything the "PDS" sends. First byte even: the upgrade
//! answer and what follows it; odd: frames on an upgraded connection.
//! Read sizes vary with the input, so every split point gets exercised.
#![no_main]
use futures::{AsyncRead, AsyncWrite};
use libfuzzer_sys::fuzz_target;
use sluice_shard::wsin::{WsError, WsIn};
use std::pin::Pin;
use std::task::{Context, Poll};

struct Peer<'a> {
    answer: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Peer<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.answer.len()).min(self.chunk);
        buf[..n].copy_from_slice(&self.answer[..n]);
        self.answer = &self.answer[n..];
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Peer<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let peer = Peer { answer: rest, chunk: 1 + (mode as usize >> 1) };
    futures::executor::block_on(async {
        let mut ws = if mode % 2 == 0 {
            match WsIn::connect(peer, "pds.example", "/xrpc/com.atproto.sync.subscribeRepos?cursor=1").await {
                Ok(ws) => ws,
                Err(_) => return,
            }
        } else {
            WsIn::upgraded(peer)
        };
        // The input is finite: the stream ends (or fails) within it.
        loop {
            match ws.next().await {
                Ok(_) => {}
                Err(WsError::Ended) | Err(_) => break,
            }
        }
    });
});
