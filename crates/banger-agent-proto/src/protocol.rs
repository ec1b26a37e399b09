//! The frame codec and the flow-control pieces both ends share.
//!
//! 1. [`read_frame`] / [`write_frame`] move one frame (`u32 header_len | u32
//!    payload_len | JSON header | payload`, lengths big-endian) over any
//!    `AsyncRead`/`AsyncWrite`.
//! 2. [`spawn_writer`] owns the write half: every task of a connection queues
//!    frames on one queue, so frames of one session stay in order. A well
//!    behaved peer keeps the queue small (data frames only go out against
//!    credit, [`SendWindow`]; control frames answer frames the peer sent),
//!    and the queue is capped at [`WRITE_QUEUE_LIMIT`] bytes: a peer that
//!    makes it overflow (it sends but does not read) loses the connection.
//!    [`FrameSender::shut_down`] ends the writer at once, so a reader that
//!    gives up on a peer closes both directions.
//! 3. [`SendWindow`] is the sender's view of one stream's window;
//!    [`ReceiveStream`] is the receiver's, and returns credit as its consumer
//!    takes the bytes.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use banger_proto::agent::{Frame, StreamId, INITIAL_WINDOW, MAX_HEADER_LEN, MAX_PAYLOAD_LEN};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, Notify};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("Connection I/O failed")]
    Io(#[from] io::Error),
    #[error("Frame header of {len} bytes exceeds the limit")]
    HeaderTooLarge { len: u32 },
    #[error("Frame payload of {len} bytes exceeds the limit")]
    PayloadTooLarge { len: u32 },
    #[error("Frame header is not valid JSON")]
    DecodeHeader(#[source] serde_json::Error),
    #[error("Connection closed in the middle of a frame")]
    Truncated,
    #[error("The peer does not read: more than {limit} bytes of frames are queued for it")]
    QueueOverflow { limit: usize },
}

/// Reads one frame; `None` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<(Frame, Bytes)>, FrameError> {
    let mut lengths = [0_u8; 8];
    let mut filled = 0;
    while filled < lengths.len() {
        let read = reader.read(&mut lengths[filled..]).await?;
        if read == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        filled += read;
    }
    let header_len = u32::from_be_bytes([lengths[0], lengths[1], lengths[2], lengths[3]]);
    let payload_len = u32::from_be_bytes([lengths[4], lengths[5], lengths[6], lengths[7]]);
    if header_len > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLarge { len: header_len });
    }
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(FrameError::PayloadTooLarge { len: payload_len });
    }
    let mut header = vec![0_u8; header_len as usize];
    read_exact(reader, &mut header).await?;
    let mut payload = vec![0_u8; payload_len as usize];
    read_exact(reader, &mut payload).await?;
    let frame = serde_json::from_slice(&header).map_err(FrameError::DecodeHeader)?;
    Ok(Some((frame, Bytes::from(payload))))
}

async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut [u8],
) -> Result<(), FrameError> {
    match reader.read_exact(buffer).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(error) => Err(FrameError::Io(error)),
    }
}

/// Writes one frame (without flushing).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
    payload: &[u8],
) -> Result<(), FrameError> {
    let header = serde_json::to_vec(frame).map_err(FrameError::DecodeHeader)?;
    let header_len = u32::try_from(header.len()).unwrap_or(u32::MAX);
    if header_len > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLarge { len: header_len });
    }
    let payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(FrameError::PayloadTooLarge { len: payload_len });
    }
    let mut lengths = [0_u8; 8];
    lengths[..4].copy_from_slice(&header_len.to_be_bytes());
    lengths[4..].copy_from_slice(&payload_len.to_be_bytes());
    writer.write_all(&lengths).await?;
    writer.write_all(&header).await?;
    writer.write_all(payload).await?;
    Ok(())
}

/// A frame queued for the writer task.
#[derive(Debug)]
pub struct Outgoing {
    pub frame: Frame,
    pub payload: Bytes,
}

/// Most bytes a connection's write queue holds (payloads plus
/// [`FRAME_COST`] per frame) before the connection is closed.
pub const WRITE_QUEUE_LIMIT: usize = 32 * 1024 * 1024;
/// What a queued frame costs besides its payload (header and bookkeeping).
pub const FRAME_COST: usize = 256;

#[derive(Debug)]
struct QueueState {
    /// Bytes queued and not yet written.
    queued: AtomicUsize,
    limit: usize,
    /// Why the writer must stop at once (`Some` once it must).
    stop: watch::Sender<Option<StopReason>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Overflow,
    ShutDown,
}

impl QueueState {
    fn stop(&self, reason: StopReason) {
        self.stop.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }

    async fn stopped(&self) -> StopReason {
        let mut receiver = self.stop.subscribe();
        let reason = receiver
            .wait_for(Option::is_some)
            .await
            .map(|reason| *reason);
        match reason {
            Ok(Some(reason)) => reason,
            // The sender lives as long as `self`.
            _ => std::future::pending().await,
        }
    }
}

/// The sending side of a connection's frame queue; cheap to clone.
#[derive(Debug, Clone)]
pub struct FrameSender {
    queue: mpsc::UnboundedSender<Outgoing>,
    state: Arc<QueueState>,
}

/// A [`FrameSender`] that does not keep the connection open.
#[derive(Debug, Clone)]
pub struct WeakFrameSender {
    queue: mpsc::WeakUnboundedSender<Outgoing>,
    state: Arc<QueueState>,
}

/// The frame was not queued: the connection is closed, or its queue overflowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("The connection is closed")]
pub struct QueueClosed;

impl FrameSender {
    /// Queues a frame. Past the queue's limit the connection is closed and
    /// every later frame refused.
    pub fn send(&self, outgoing: Outgoing) -> Result<(), QueueClosed> {
        if self.state.stop.borrow().is_some() {
            return Err(QueueClosed);
        }
        let cost = outgoing.payload.len() + FRAME_COST;
        let before = self.state.queued.fetch_add(cost, Ordering::AcqRel);
        if before + cost > self.state.limit {
            self.state.queued.fetch_sub(cost, Ordering::AcqRel);
            self.state.stop(StopReason::Overflow);
            return Err(QueueClosed);
        }
        self.queue.send(outgoing).map_err(|_| {
            self.state.queued.fetch_sub(cost, Ordering::AcqRel);
            QueueClosed
        })
    }

    pub fn downgrade(&self) -> WeakFrameSender {
        WeakFrameSender {
            queue: self.queue.downgrade(),
            state: Arc::clone(&self.state),
        }
    }

    /// Ends the writer without writing what is still queued.
    pub fn shut_down(&self) {
        self.state.stop(StopReason::ShutDown);
    }

    /// Resolves once the queue overflowed (the connection is being closed).
    pub async fn overflowed(&self) {
        overflowed(&self.state).await;
    }
}

async fn overflowed(state: &QueueState) {
    loop {
        if state.stopped().await == StopReason::Overflow {
            return;
        }
        std::future::pending::<()>().await;
    }
}

impl WeakFrameSender {
    pub fn upgrade(&self) -> Option<FrameSender> {
        Some(FrameSender {
            queue: self.queue.upgrade()?,
            state: Arc::clone(&self.state),
        })
    }

    /// See [`FrameSender::shut_down`].
    pub fn shut_down(&self) {
        self.state.stop(StopReason::ShutDown);
    }

    /// See [`FrameSender::overflowed`].
    pub async fn overflowed(&self) {
        overflowed(&self.state).await;
    }
}

/// Queues a frame without payload; false when the connection is gone.
pub fn send_frame(sender: &FrameSender, frame: Frame) -> bool {
    sender
        .send(Outgoing {
            frame,
            payload: Bytes::new(),
        })
        .is_ok()
}

/// A frame queue holding at most `limit` bytes, and its receiving end.
fn frame_queue(limit: usize) -> (FrameSender, mpsc::UnboundedReceiver<Outgoing>) {
    let (queue, receiver) = mpsc::unbounded_channel();
    let (stop, _) = watch::channel(None);
    let state = Arc::new(QueueState {
        queued: AtomicUsize::new(0),
        limit,
        stop,
    });
    (FrameSender { queue, state }, receiver)
}

/// Starts the task that owns the write half; it ends when every sender is
/// dropped, a write fails, the queue overflows or a sender shuts it down,
/// and returns the error if one happened.
pub fn spawn_writer<W>(writer: W) -> (FrameSender, tokio::task::JoinHandle<Result<(), FrameError>>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    spawn_writer_with_limit(writer, WRITE_QUEUE_LIMIT)
}

/// [`spawn_writer`] with a queue of `limit` bytes.
pub fn spawn_writer_with_limit<W>(
    writer: W,
    limit: usize,
) -> (FrameSender, tokio::task::JoinHandle<Result<(), FrameError>>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (sender, receiver) = frame_queue(limit);
    let state = Arc::clone(&sender.state);
    let task = tokio::spawn(async move {
        tokio::select! {
            result = write_queue(writer, receiver, &state) => result,
            reason = state.stopped() => match reason {
                StopReason::Overflow => Err(FrameError::QueueOverflow { limit: state.limit }),
                StopReason::ShutDown => Ok(()),
            },
        }
    });
    (sender, task)
}

async fn write_queue<W: AsyncWrite + Unpin>(
    writer: W,
    mut receiver: mpsc::UnboundedReceiver<Outgoing>,
    state: &QueueState,
) -> Result<(), FrameError> {
    let mut writer = BufWriter::with_capacity(128 * 1024, writer);
    while let Some(outgoing) = receiver.recv().await {
        write_queued(&mut writer, outgoing, state).await?;
        // Batch what is already queued, flush once the queue is empty.
        while let Ok(outgoing) = receiver.try_recv() {
            write_queued(&mut writer, outgoing, state).await?;
        }
        writer.flush().await?;
    }
    let _ = writer.shutdown().await;
    Ok(())
}

async fn write_queued<W: AsyncWrite + Unpin>(
    writer: &mut W,
    outgoing: Outgoing,
    state: &QueueState,
) -> Result<(), FrameError> {
    write_frame(writer, &outgoing.frame, &outgoing.payload).await?;
    state
        .queued
        .fetch_sub(outgoing.payload.len() + FRAME_COST, Ordering::AcqRel);
    Ok(())
}

/// The sender's side of one stream's window.
#[derive(Debug)]
pub struct SendWindow {
    state: Mutex<WindowState>,
    changed: Notify,
}

#[derive(Debug)]
struct WindowState {
    available: u64,
    closed: bool,
}

impl Default for SendWindow {
    fn default() -> Self {
        Self {
            state: Mutex::new(WindowState {
                available: u64::from(INITIAL_WINDOW),
                closed: false,
            }),
            changed: Notify::new(),
        }
    }
}

impl SendWindow {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The peer consumed `bytes`.
    pub fn grant(&self, bytes: u32) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.available = state.available.saturating_add(u64::from(bytes));
        drop(state);
        self.changed.notify_waiters();
    }

    /// The session ended; waiting senders give up.
    pub fn close(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.changed.notify_waiters();
    }

    /// Waits for credit and takes up to `wanted` bytes of it; `None` when closed.
    pub async fn take(&self, wanted: usize) -> Option<usize> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                if state.closed {
                    return None;
                }
                if state.available > 0 {
                    let granted = usize::try_from(state.available)
                        .unwrap_or(usize::MAX)
                        .min(wanted);
                    state.available -= granted as u64;
                    return Some(granted);
                }
            }
            notified.await;
        }
    }

    /// Sends `data` on `stream` as `Data` frames, waiting for credit as needed.
    /// Returns false when the window was closed or the connection is gone.
    pub async fn send(
        &self,
        frames: &FrameSender,
        session: u64,
        stream: StreamId,
        mut data: Bytes,
    ) -> bool {
        while !data.is_empty() {
            let wanted = data.len().min(MAX_PAYLOAD_LEN as usize);
            let Some(granted) = self.take(wanted).await else {
                return false;
            };
            let chunk = data.split_to(granted);
            let sent = frames.send(Outgoing {
                frame: Frame::Data { session, stream },
                payload: chunk,
            });
            if sent.is_err() {
                return false;
            }
        }
        true
    }
}

/// Bookkeeping of a stream the local side receives: bytes the peer may still
/// send before it must wait for credit.
#[derive(Debug)]
pub struct ReceiveWindow {
    outstanding: Mutex<u64>,
}

impl Default for ReceiveWindow {
    fn default() -> Self {
        Self {
            outstanding: Mutex::new(0),
        }
    }
}

impl ReceiveWindow {
    /// Records `len` arrived bytes; false if the peer overran its window.
    pub fn arrived(&self, len: usize) -> bool {
        let mut outstanding = self
            .outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *outstanding += len as u64;
        *outstanding <= u64::from(INITIAL_WINDOW)
    }

    fn consumed(&self, len: usize) {
        let mut outstanding = self
            .outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *outstanding = outstanding.saturating_sub(len as u64);
    }
}

/// The receiving end of one stream: chunks in arrival order, `None` after
/// `Eof`. Taking a chunk returns its credit to the peer.
#[derive(Debug)]
pub struct ReceiveStream {
    chunks: mpsc::UnboundedReceiver<Bytes>,
    window: Arc<ReceiveWindow>,
    frames: FrameSender,
    session: u64,
    stream: StreamId,
}

/// Where the connection's reader delivers a stream's chunks.
#[derive(Debug, Clone)]
pub struct StreamInlet {
    chunks: mpsc::UnboundedSender<Bytes>,
    window: Arc<ReceiveWindow>,
}

impl StreamInlet {
    /// Delivers a chunk. Err(true) when the peer overran the window,
    /// Err(false) when the consumer is gone (the caller returns the credit).
    pub fn deliver(&self, chunk: Bytes) -> Result<(), bool> {
        if !self.window.arrived(chunk.len()) {
            return Err(true);
        }
        let len = chunk.len();
        if self.chunks.send(chunk).is_err() {
            self.window.consumed(len);
            return Err(false);
        }
        Ok(())
    }
}

/// A new stream: the reader's inlet and the consumer's receiving end.
pub fn receive_stream(
    frames: FrameSender,
    session: u64,
    stream: StreamId,
) -> (StreamInlet, ReceiveStream) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let window = Arc::new(ReceiveWindow::default());
    (
        StreamInlet {
            chunks: sender,
            window: Arc::clone(&window),
        },
        ReceiveStream {
            chunks: receiver,
            window,
            frames,
            session,
            stream,
        },
    )
}

impl ReceiveStream {
    /// The next chunk, or `None` once the peer sent `Eof` (or the session ended).
    pub async fn recv(&mut self) -> Option<Bytes> {
        std::future::poll_fn(|context| self.poll_recv(context)).await
    }

    /// Poll form of [`Self::recv`].
    pub fn poll_recv(
        &mut self,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
        let chunk = std::task::ready!(self.chunks.poll_recv(context));
        if let Some(chunk) = &chunk {
            self.window.consumed(chunk.len());
            if let Ok(bytes) = u32::try_from(chunk.len()) {
                if bytes > 0 {
                    send_frame(
                        &self.frames,
                        Frame::Credit {
                            session: self.session,
                            stream: self.stream,
                            bytes,
                        },
                    );
                }
            }
        }
        std::task::Poll::Ready(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_through_the_codec() {
        let (mut left, mut right) = tokio::io::duplex(1024);
        let frame = Frame::Data {
            session: 3,
            stream: StreamId::Stdout,
        };
        write_frame(&mut left, &frame, b"hello").await.unwrap();
        left.flush().await.unwrap();
        drop(left);
        let (read, payload) = read_frame(&mut right).await.unwrap().unwrap();
        assert_eq!(read, frame);
        assert_eq!(&payload[..], b"hello");
        assert!(read_frame(&mut right).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_refused() {
        let (mut left, mut right) = tokio::io::duplex(1024);
        left.write_all(&(MAX_HEADER_LEN + 1).to_be_bytes())
            .await
            .unwrap();
        left.write_all(&0_u32.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame(&mut right).await,
            Err(FrameError::HeaderTooLarge { .. })
        ));

        let (mut left, mut right) = tokio::io::duplex(1024);
        left.write_all(&[0, 0, 0]).await.unwrap();
        drop(left);
        assert!(matches!(
            read_frame(&mut right).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn send_window_blocks_until_credit_arrives() {
        let window = SendWindow::new();
        let whole = INITIAL_WINDOW as usize;
        assert_eq!(window.take(whole * 2).await, Some(whole));
        let waiting = {
            let window = Arc::clone(&window);
            tokio::spawn(async move { window.take(10).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        window.grant(4);
        assert_eq!(waiting.await.unwrap(), Some(4));
        window.close();
        assert_eq!(window.take(1).await, None);
    }

    #[tokio::test]
    async fn receive_window_detects_overrun_and_returns_credit() {
        let (frames, mut queued) = frame_queue(WRITE_QUEUE_LIMIT);
        let (inlet, mut stream) = receive_stream(frames, 9, StreamId::Stdin);
        assert!(inlet
            .deliver(Bytes::from(vec![0; INITIAL_WINDOW as usize]))
            .is_ok());
        assert_eq!(inlet.deliver(Bytes::from_static(b"x")), Err(true));
        let chunk = stream.recv().await.unwrap();
        assert_eq!(chunk.len(), INITIAL_WINDOW as usize);
        let credit = queued.recv().await.unwrap();
        assert_eq!(
            credit.frame,
            Frame::Credit {
                session: 9,
                stream: StreamId::Stdin,
                bytes: INITIAL_WINDOW
            }
        );
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_overflows_the_queue_and_loses_the_connection() {
        // The peer never reads: the writer blocks once the pipe is full.
        let (left, mut right) = tokio::io::duplex(1024);
        let limit = 64 * 1024;
        let (frames, writer) = spawn_writer_with_limit(left, limit);
        let frame = Frame::Credit {
            session: 1,
            stream: StreamId::Stdout,
            bytes: 1,
        };
        let mut queued = 0;
        while send_frame(&frames, frame.clone()) {
            queued += 1;
            assert!(
                queued * FRAME_COST <= limit + FRAME_COST,
                "queue grew past its limit"
            );
        }
        assert!(
            queued >= limit / FRAME_COST - 8,
            "refused early, after {queued}"
        );
        assert!(matches!(
            writer.await.unwrap(),
            Err(FrameError::QueueOverflow { limit: 65536 })
        ));
        // Every later frame is refused, and the write half is gone.
        assert!(!send_frame(&frames, frame));
        let mut sink = Vec::new();
        right.read_to_end(&mut sink).await.unwrap();
    }

    #[tokio::test]
    async fn shut_down_ends_the_writer_of_a_blocked_peer() {
        let (left, _right) = tokio::io::duplex(16);
        let (frames, writer) = spawn_writer(left);
        frames
            .send(Outgoing {
                frame: Frame::Data {
                    session: 1,
                    stream: StreamId::Stdin,
                },
                payload: Bytes::from(vec![0; 4096]),
            })
            .unwrap();
        frames.downgrade().shut_down();
        assert!(writer.await.unwrap().is_ok());
        assert!(!send_frame(&frames, Frame::Cancel { session: 1 }));
    }
}
